"""Where a benchmark's results go and what they record besides the numbers.

Each script in ``benchmarks/`` writes ``results/<name>.md`` (for people) and ``results/<name>.json``
(for machines) through :func:`write_results`. Both carry the provenance a number needs to mean
anything: the machine (:func:`sfp_onnx.runtime.bench.machine_info`), the package versions, the exact
command line, the date, and the load average at the start and end of the run (the benchmark machines
may be shared). Scripts report; they never fail on a number.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path

from sfp_onnx._io import atomic_path, write_json
from sfp_onnx.runtime.bench import machine_info, versions

__all__ = [
    "RESULTS",
    "Run",
    "command_line",
    "default_out",
    "md_table",
    "package_versions",
    "rewrite_markdown",
    "write_results",
]

RESULTS = Path(__file__).resolve().parent / "results"
# Loads above this many runnable processes per core at start or end get a note in the .md.
_BUSY_LOAD_PER_CORE = 0.5


def command_line() -> str:
    """This process's command line as one could retype it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):  # a script outside the repository stays absolute
        script = script.relative_to(Path(__file__).resolve().parents[1])
    return shlex.join(["python", str(script), *sys.argv[1:]])


def package_versions(*extra: str) -> dict[str, str]:
    """:func:`sfp_onnx.runtime.bench.versions`, torch, torchvision and the ``extra`` packages."""
    found = dict(versions())
    for name in ("torch", "torchvision", *extra):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def default_out(quick: bool) -> Path:
    """``results/`` for a real run; a scratch folder for a ``--quick`` smoke run."""
    if quick:
        return Path(tempfile.gettempdir()) / "sfp-onnx-bench-quick"
    return RESULTS


class Run:
    """One benchmark run: its provenance, taken when it starts and completed when written."""

    def __init__(self, name: str, *extra_packages: str) -> None:
        self.name = name
        self.started = dt.datetime.now(dt.timezone.utc)
        self.load_start = _load_average()
        self.provenance = {
            "benchmark": name,
            "date": self.started.isoformat(timespec="seconds"),
            "command": command_line(),
            "machine": machine_info(),
            "versions": package_versions(*extra_packages),
        }

    def finish(self) -> dict:
        """The provenance with the run's duration and load averages."""
        ended = dt.datetime.now(dt.timezone.utc)
        return {
            **self.provenance,
            "seconds": round((ended - self.started).total_seconds(), 1),
            "load_average": {"start": self.load_start, "end": _load_average()},
        }


def write_results(
    run: Run,
    out: str | os.PathLike,
    *,
    title: str,
    body: str,
    data: Mapping[str, object],
    notes: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write ``<out>/<name>.md`` and ``.json``: provenance, then the body / the data.

    Args:
        run: the run, for its name and provenance.
        out: the folder (created if missing).
        title: the Markdown title.
        body: Markdown after the provenance block (tables, the headline numbers).
        data: everything measured, as plain JSON values.
        notes: caveats, one line each; a note on machine load is added when it was busy.

    Returns:
        The paths of the .md and the .json file.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    info = run.finish()
    notes = [*notes, *_load_notes(info)]
    json_path = folder / f"{run.name}.json"
    md_path = folder / f"{run.name}.md"
    write_json(json_path, {**info, "notes": notes, **data})
    _write_markdown(md_path, info, notes, title, body)
    return md_path, json_path


def rewrite_markdown(json_path: str | os.PathLike, *, title: str, body: str) -> Path:
    """Write the ``.md`` beside a results JSON again (a new table layout, say), keeping the
    provenance and notes of the run that measured it. Returns the path of the ``.md``."""
    info = json.loads(Path(json_path).read_text(encoding="utf-8"))
    md_path = Path(json_path).with_suffix(".md")
    _write_markdown(md_path, info, info.get("notes", []), title, body)
    return md_path


def _write_markdown(path: Path, info: Mapping, notes: Sequence[str], title: str, body: str) -> None:
    text = "\n".join([f"# {title}", "", *_provenance_lines(info), "", *_note_lines(notes), body])
    with atomic_path(path, suffix=".md") as tmp:
        Path(tmp).write_text(text.rstrip() + "\n", encoding="utf-8")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table; the first column left-aligned, the others right-aligned."""
    align = [":--", *["--:"] * (len(headers) - 1)]
    lines = [_md_row(headers), _md_row(align)]
    lines += [_md_row([str(cell) for cell in row]) for row in rows]
    return "\n".join(lines)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _load_notes(info: Mapping) -> list[str]:
    cores = info["machine"].get("cores") or 1
    loads = [v for v in info["load_average"].values() if v]
    worst = max((v[0] for v in loads), default=0.0)
    if worst / cores <= _BUSY_LOAD_PER_CORE:
        return []
    return [
        f"The machine was shared while this ran (1-minute load average up to {worst:.1f} on "
        f"{cores} cores): times are noisier than on an idle machine. The compared cases ran "
        "interleaved, so the load fell on all of them alike; ratios hold better than times."
    ]


def _provenance_lines(info: Mapping) -> list[str]:
    machine = info["machine"]
    pkgs = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    load = info["load_average"]
    return [
        f"- date: {info['date']} ({info['seconds']:.0f} s)",
        f"- command: `{info['command']}`",
        f"- machine: {machine['cpu']}, {machine['cores']} logical cores, "
        f"{machine['gpu'] or 'no GPU'}; {machine['os']}",
        f"- versions: {pkgs}",
        f"- load average (1, 5, 15 min): start {load['start']}, end {load['end']}",
    ]


def _note_lines(notes: Sequence[str]) -> list[str]:
    if not notes:
        return []
    return ["Notes:", "", *[f"- {note}" for note in notes], ""]
