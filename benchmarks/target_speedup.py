"""Speed targets: how close `plan --target-speedup` lands, timed again on the file it gives.

For each model, batch size and target, :func:`sfp_onnx.speed_targets.plan_for_speed` searches
the plan (timing each candidate against the original, interleaved); the chosen plan is then
applied with ``prune --plan`` and the written file is timed once more, independently, with
as many interleaved runs as fit the budget. The table gives the target, the speedup the search
saw, the speedup re-measured on the written file, its error against the target, the MACs
kept and the rounds the search needed.

Usage (from the repository root)::

    python benchmarks/target_speedup.py                       # the default sweep
    python benchmarks/target_speedup.py --models resnet20@32 --batch-sizes 1 --targets 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _models import bench_on_budget, export_model
from _results import Run, default_out, md_table, rewrite_markdown, write_results

import sfp_onnx
from sfp_onnx.graph.measure import measure_model
from sfp_onnx.runtime.bench import speedups
from sfp_onnx.speed_targets import SpeedSearch, plan_for_speed

MODELS = ("resnet20@32", "mobilenet_v2@224", "resnet18@224", "resnet50@224")
TARGETS = (1.5, 2.0, 3.0)
TITLE = "Speed targets: planned vs re-measured speedup"


def parse_args() -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="name@size specs")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=(1, 32))
    parser.add_argument("--targets", nargs="+", type=float, default=TARGETS)
    parser.add_argument("--round-to", default="auto", help="none, K or auto")
    parser.add_argument("--round-seconds", type=float, default=10.0, help="timing per round")
    parser.add_argument("--seconds", type=float, default=30.0, help="budget of the re-timing")
    parser.add_argument("--workdir", type=Path, help="keep the ONNX files here (default: temp)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results)")
    parser.add_argument("--name", default="target_speedup", help="results file name")
    parser.add_argument(
        "--plot", nargs="+", type=Path, metavar="JSON",
        help="no timing: draw the plot of these results files (into --out, as --name.png)",
    )  # fmt: skip
    parser.add_argument(
        "--render", type=Path, metavar="JSON",
        help="no timing: write this results file's .md (and plot) again from its rows",
    )  # fmt: skip
    args = parser.parse_args()
    args.out = args.out or (args.render.parent if args.render else default_out(False))
    if args.render:
        args.name = args.render.stem
    return args


def measure(spec: str, batch: int, target: float, args, folder: Path) -> dict:
    """Search the plan for ``target``, write it, time the written file again."""
    source = export_model(spec, folder)
    started = time.perf_counter()
    rounds: list[str] = []
    search = SpeedSearch(batch=batch, provider="cpu", seconds=args.round_seconds,
                         cache_dir=folder / "cache")  # fmt: skip
    plan, points = plan_for_speed(
        source, target_speedup=target, round_to=args.round_to, search=search,
        progress=rounds.append,
    )  # fmt: skip
    search_s = time.perf_counter() - started
    stem = spec.replace("@", "_")
    slim = folder / f"{stem}_b{batch}_x{target:g}.onnx"
    sfp_onnx.prune(source, slim, plan=plan)
    report, runs = bench_on_budget([source, slim], batch, seconds=args.seconds)
    retimed = speedups(report)[(str(slim), batch)]
    macs = measure_model(slim).macs / measure_model(source).macs
    return {
        "model": spec, "batch": batch, "target": target,
        "search_speedup": plan.measured["speedup"], "retimed_speedup": retimed,
        "error": retimed / target - 1, "macs_kept": macs,
        "predicted_macs_kept": plan.predicted_macs / plan.full_macs,
        "rounds": sum(r.startswith(("timing", "confirming")) for r in rounds),
        "points": len(points),
        "retime_runs": runs, "search_seconds": round(search_s, 1), "reached": plan.reached,
        "round_to": plan.round_to,
    }  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    """Speedup re-timed (filled) and seen by the search (hollow) against the target, per model
    and batch; the ±5% band around "as asked"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    targets = sorted({r["target"] for r in rows})
    span = [targets[0] * 0.9, targets[-1] * 1.1]
    ax.plot(span, span, color="grey", linewidth=0.8)
    ax.fill_between(span, [t * 0.95 for t in span], [t * 1.05 for t in span], color="grey",
                    alpha=0.15, label="target ±5%")  # fmt: skip
    cases: dict[tuple, list] = {}
    for row in rows:
        cases.setdefault((row["model"], row["batch"]), []).append(row)
    for index, ((model, batch), points) in enumerate(sorted(cases.items())):
        color = f"C{index % 10}"
        points.sort(key=lambda r: r["target"])
        xs = [r["target"] * (1 + 0.012 * (index - len(cases) / 2)) for r in points]
        ax.plot(xs, [r["retimed_speedup"] for r in points], marker="o", color=color,
                label=f"{model} b{batch}")  # fmt: skip
        ax.scatter(xs, [r["search_speedup"] for r in points], facecolors="none",
                   edgecolors=color)  # fmt: skip
    ax.set_xlabel("target speedup")
    ax.set_ylabel("measured speedup (filled: re-timed file; hollow: the search)")
    ax.set_title("plan --target-speedup on this machine's CPU (onnxruntime)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    if args.plot:
        rows = [row for file in args.plot for row in json.loads(file.read_text())["rows"]]
        plot(rows, args.out / f"{args.name}.png")
        return
    if args.render:
        rows = json.loads(args.render.read_text())["rows"]
        rewrite_markdown(args.render, title=TITLE, body=render(rows, args))
        return
    run = Run(args.name)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.workdir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for spec in args.models:
            for batch in args.batch_sizes:
                for target in args.targets:
                    row = measure(spec, batch, target, args, folder)
                    print(
                        f"{spec} b{batch} x{target:g}: {row['retimed_speedup']:.2f}x "
                        f"({row['error']:+.1%}), MACs kept {row['macs_kept']:.1%}",
                        flush=True,
                    )
                    rows.append(row)
    write_results(run, args.out, title=TITLE, body=render(rows, args), data={"rows": rows})


def verdict(row: dict) -> str:
    """Within ±5% of the target when re-timed; out of reach (and why); or a miss."""
    if abs(row["error"]) <= 0.05:
        return "within 5%"
    if not row["reached"]:
        return f"out of reach: floor keeps {row['macs_kept']:.1%} of MACs"
    return "miss"


def render(rows: list[dict], args) -> str:
    """The Markdown body: the headline count, the table, the plot (drawn here)."""
    headers = ["model", "batch", "target", "search saw", "re-timed", "error", "MACs kept",
               "rounds", "search s", "verdict"]  # fmt: skip
    table = md_table(headers, [
        [r["model"], r["batch"], f"{r['target']:g}×", f"{r['search_speedup']:.2f}×",
         f"{r['retimed_speedup']:.2f}×", f"{r['error']:+.1%}", f"{r['macs_kept']:.1%}",
         r["rounds"], r["search_seconds"], verdict(r)] for r in rows
    ])  # fmt: skip
    verdicts = [verdict(r) for r in rows]
    within = verdicts.count("within 5%")
    unreachable = sum(v.startswith("out of reach") for v in verdicts)
    rounding = sorted({str(r.get("round_to")) for r in rows})
    args.out.mkdir(parents=True, exist_ok=True)  # the plot is drawn before the results are written
    plot(rows, args.out / f"{args.name}.png")
    return (f"{within} of {len(rows)} within ±5% of the target when re-timed; "
            f"{unreachable} out of reach, said by the plan (every group at its floor, "
            f"--max-rate 0.7, widths in multiples of {', '.join(rounding)}); "
            f"{len(rows) - within - unreachable} missed.\n\n{table}\n\n"
            f"![measured against target speedup]({args.name}.png)\n")  # fmt: skip


if __name__ == "__main__":
    main()
