"""How long the ONNX-side work takes: analysis, soft pruning, surgery, verification.

Times each stage of ``sfp_onnx.prune`` on its own, with the library's stage functions, and
the whole call end to end: load (read, normalise, infer shapes), analyze (channel groups),
soft-prune (score and zero), find zeros (the channels removable at every consumer),
rewrite (the surgery, on a clone), verify (masked vs slim in onnxruntime) and save.
Models: torchvision ResNet-50 (224x224) and a generated 500-layer CNN, the CIFAR ResNet of
depth 500 (6n+2 with n = 83: 499 3x3 convs with the stem, two 1x1 projection shortcuts,
1 Linear). Each measurement is the median of several repeats.

Usage (from the repository root)::

    python benchmarks/surgery_time.py            # ~3 min on 2 cores
    python benchmarks/surgery_time.py --quick    # smoke run, into a scratch folder
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx
from _models import export_model
from _results import Run, default_out, md_table, write_results

import sfp_onnx
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.load import clone_model, load_model, save_model
from sfp_onnx.graph.rewrite import rewrite_model
from sfp_onnx.graph.soft_prune import soft_prune_model
from sfp_onnx.graph.zeros import removable_channels
from sfp_onnx.runtime.verify import verify_models
from sfp_onnx.training.zoo import create_cifar_resnet, export_onnx

MODELS = ("resnet50@224", "resnet500@32")
STAGES = ("load", "analyze", "soft-prune", "find zeros", "rewrite", "verify", "save")


def parse_args() -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="name@size specs")
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keep the ONNX files here (default: temp)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one small model")
    args = parser.parse_args()
    if args.quick:
        args.models, args.repeats = ["resnet20@32"], 1
    args.out = args.out or default_out(args.quick)
    return args


def export(spec: str, folder: Path) -> Path:
    """``resnet500@32`` is generated here (any CIFAR depth 6n+2); the rest via _models."""
    name, _, size = spec.partition("@")
    depth = name.removeprefix("resnet")
    if depth.isdigit() and (int(depth) - 2) % 6 == 0 and int(size or 32) == 32:
        path = folder / f"{name}_32.onnx"
        if not path.exists():
            export_onnx(create_cifar_resnet(int(depth)), path)
        return path
    return export_model(spec, folder)


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """``fn()`` and its wall time in seconds."""
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def stage_times(path: Path, out: Path, rate: float) -> dict[str, float]:
    """One pass through the stages of ``prune``; seconds per stage."""
    seconds = {}
    model, seconds["load"] = timed(lambda: load_model(path))
    analysis, seconds["analyze"] = timed(lambda: analyze_model(model))
    _, seconds["soft-prune"] = timed(lambda: soft_prune_model(model, analysis.groups, rate=rate))
    removed, seconds["find zeros"] = timed(lambda: removable_channels(model, analysis))
    slim = clone_model(model)
    _, seconds["rewrite"] = timed(lambda: rewrite_model(slim, analysis, removed))
    check, seconds["verify"] = timed(lambda: verify_models(model, slim))
    _, seconds["save"] = timed(lambda: save_model(slim, out))
    if not check.exact:
        raise RuntimeError(f"{path.name}: the slim model is not exact")
    return seconds


def measure(spec: str, args: argparse.Namespace, folder: Path) -> dict:
    """Median stage times and end-to-end ``prune`` time of one model."""
    path = export(spec, folder)
    proto = onnx.load(str(path), load_external_data=False)
    convs = sum(node.op_type == "Conv" for node in proto.graph.node)
    passes = [stage_times(path, folder / "slim.onnx", args.rate) for _ in range(args.repeats)]
    stages = {s: statistics.median(p[s] for p in passes) for s in STAGES}
    ends = []
    for _ in range(args.repeats):
        _, seconds = timed(lambda: sfp_onnx.prune(path, folder / "p.onnx", rate=args.rate))
        ends.append(seconds)
    groups = analyze_model(load_model(path)).groups
    return {
        "model": spec,
        "nodes": len(proto.graph.node),
        "convs": convs,
        "groups": len(groups),
        "prunable_groups": sum(g.prunable for g in groups),
        "stages_s": stages,
        "analysis_and_surgery_s": sum(stages[s] for s in ("analyze", "find zeros", "rewrite")),
        "prune_end_to_end_s": statistics.median(ends),
        "repeats": args.repeats,
    }


def main() -> None:
    """Run the benchmark and write its results."""
    args = parse_args()
    run = Run("surgery_time")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        results = []
        for spec in args.models:
            print(spec, flush=True)
            results.append(measure(spec, args, folder))
    headers = [
        "model",
        "nodes",
        "Conv",
        "groups (prunable)",
        *STAGES,
        "analysis + surgery",
        "prune end to end",
    ]
    rows = [
        [
            r["model"],
            r["nodes"],
            r["convs"],
            f"{r['groups']} ({r['prunable_groups']})",
            *(f"{r['stages_s'][s]:.2f}" for s in STAGES),
            f"**{r['analysis_and_surgery_s']:.2f}**",
            f"{r['prune_end_to_end_s']:.2f}",
        ]
        for r in results
    ]
    body = "\n".join(
        [
            f"Seconds, median of {args.repeats} repeats, rate {args.rate}, no rounding. "
            "*analysis + surgery* = analyze + find zeros + rewrite. *prune end to end* is the "
            "`sfp_onnx.prune` call, which also measures MACs and parameters of both files.\n",
            md_table(headers, rows),
        ]
    )
    md, js = write_results(
        run,
        args.out,
        title="Analysis and surgery time",
        body=body,
        data={"rate": args.rate, "results": results},
    )
    print(f"wrote {md}, {js}")


if __name__ == "__main__":
    main()
