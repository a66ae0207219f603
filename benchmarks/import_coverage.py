"""Which torchvision classifiers import into torch exactly, from which exporter.

The matrix of tests/test_import_coverage.py, tabulated: 18 torchvision classifiers (random
weights, randomised BatchNorm statistics, 10 classes, 32 px; VGG 64 px) × five exports with
the exporter's defaults, a fixed batch of 1: the legacy TorchScript exporter at opset 13 and
17 with BatchNorm kept or folded, and the dynamo exporter (opset 20). A cell is exact when the
model imports as ``compress`` imports it, torch at batch 4 gives onnxruntime's output within
1e-5·max|y| on real CIFAR-10 images, one SGD step reaches every Conv weight, every weight is a
parameter and every weight the pruning groups need is linked (tests/import_matrix.py).

Usage (from the repository root)::

    python benchmarks/import_coverage.py            # ~10 min on 2 cores
    python benchmarks/import_coverage.py --quick    # the fast half, into a scratch folder
    # a run on an older checkout, kept for comparison, then the comparison:
    python benchmarks/import_coverage.py --name import_coverage_before --note "code: ..."
    python benchmarks/import_coverage.py --baseline benchmarks/results/import_coverage_before.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._results import Run, default_out, md_table, write_results  # noqa: E402
from tests.import_matrix import (  # noqa: E402
    MODELS,
    TOLERANCE,
    VARIANTS,
    check_cell,
    export_default,
    input_size,
    is_fast,
)

VARIANT_NAMES = {
    "kept13": "legacy, opset 13, BN kept",
    "fold13": "legacy, opset 13, BN folded",
    "kept17": "legacy, opset 17, BN kept",
    "fold17": "legacy, opset 17, BN folded",
    "dynamo": "dynamo (default opset)",
}


def parse_args() -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the fast half of the cells")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results)")
    parser.add_argument("--name", default="import_coverage", help="results file name")
    parser.add_argument("--baseline", type=Path, help="an earlier run's .json to compare with")
    parser.add_argument("--exports", type=Path, help="folder to keep the exports in")
    parser.add_argument("--note", action="append", default=[], help="a note for the results")
    return parser.parse_args()


def run_cells(cells: list[tuple[str, str]], folder: Path) -> list[dict]:
    """Export and check every cell, printing one line each."""
    rows = []
    for model, variant in cells:
        path = export_default(model, variant, folder)
        result = check_cell(path, input_size(model))
        row = {"model": model, "variant": variant, "fast": is_fast(model, variant)}
        row |= {**asdict(result), "exact": result.exact}
        row["frozen"], row["unlinked"] = len(result.frozen), len(result.unlinked)
        rows.append(row)
        verdict = "exact" if result.exact else f"{result.stage}: {result.error}"
        print(f"{model:20s} {variant:7s} {result.seconds:5.1f}s {verdict}", flush=True)
    return rows


def cell_text(row: dict) -> str:
    """One matrix cell: a check mark and the relative difference, or what failed."""
    if row["exact"]:
        return f"✓ {row['rel_diff']:.0e}"
    if row["error"] is None:
        problems = []
        if row["convs_trained"] < row["convs"]:
            problems.append(f"{row['convs'] - row['convs_trained']} convs untrained")
        if row["frozen"] or row["unlinked"]:
            problems.append(f"{row['frozen']} frozen, {row['unlinked']} unlinked weights")
        if row["rel_diff"] > TOLERANCE:
            problems.append(f"diff {row['rel_diff']:.0e}")
        return "✗ " + ", ".join(problems)
    return f"✗ {row['stage']}"


def summary_rows(rows: list[dict], before: list[dict] | None) -> list[list[object]]:
    """Exact cells per export (and overall), with the baseline's count when given."""

    def count(cells: list[dict], variant: str | None) -> str:
        chosen = [c for c in cells if variant in (None, c["variant"])]
        return f"{sum(c['exact'] for c in chosen)}/{len(chosen)}"

    table = []
    for variant in [*VARIANTS, None]:
        label = VARIANT_NAMES[variant] if variant else "**all**"
        line = [label, count(rows, variant)]
        table.append([*line, count(before, variant)] if before is not None else line)
    return table


def failure_lines(rows: list[dict]) -> list[str]:
    """One line per cell that is not exact, with its first error."""
    return [
        f"- {r['model']} / {r['variant']} (opset {r['opset']}): {r['stage']}: {r['error']}"
        for r in rows
        if not r["exact"] and r["error"]
    ]


def render(rows: list[dict], before: list[dict] | None) -> str:
    """The Markdown body: the summary, the matrix and the failures."""
    by_cell = {(r["model"], r["variant"]): r for r in rows}
    matrix = [
        [
            model,
            *(cell_text(by_cell[(model, v)]) if (model, v) in by_cell else "" for v in VARIANTS),
        ]
        for model in MODELS
    ]
    headers = ["export", "exact"] + (["before"] if before is not None else [])
    failures = failure_lines(rows)
    return "\n".join(
        [
            "## Exact imports",
            "",
            md_table(headers, summary_rows(rows, before)),
            "",
            "## Matrix",
            "",
            "✓: exact, with max |torch − onnxruntime| / max |y| at batch 4 (tolerance "
            f"{TOLERANCE:g}); ✗: the first step that failed (load, import, exactness, train) or "
            "what the check found (untrained convs, frozen or unlinked weights).",
            "",
            md_table(["model", *VARIANTS], matrix),
            "",
            *(["## Failures", "", *failures, ""] if failures else []),
        ]
    )


def main() -> None:
    """Run the matrix and write the results."""
    args = parse_args()
    torch.set_num_threads(1)
    run = Run(args.name, "onnx2torch", "onnx-ir")
    cells = [(m, v) for m in MODELS for v in VARIANTS if not args.quick or is_fast(m, v)]
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.exports or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        rows = run_cells(cells, folder)
    before = json.loads(args.baseline.read_text())["cells"] if args.baseline else None
    if before is not None:
        keys = {(r["model"], r["variant"]) for r in rows}
        before = [b for b in before if (b["model"], b["variant"]) in keys]
    notes = [
        "Every export uses its exporter's defaults: a fixed batch of 1. The imported module is "
        "checked at batch 4 and trained at batch 4, so the fixed batch is made dynamic.",
        "Fast half (tests without -m slow): "
        f"{sum(r['fast'] for r in rows)} cells; the others are marked slow.",
    ]
    if args.baseline:
        notes.append(f"before: {args.baseline.name}, the same matrix run on the earlier code.")
    notes += args.note
    md, js = write_results(
        run,
        args.out or default_out(args.quick),
        title="Import coverage: torchvision classifiers × exporters",
        body=render(rows, before),
        data={"cells": rows, "tolerance": TOLERANCE},
        notes=notes,
    )
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
