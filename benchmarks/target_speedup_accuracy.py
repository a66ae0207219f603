"""Planned vs uniform widths at the same measured speedup, after the same fine-tune.

The shipped CIFAR ResNet-20 is planned for a speed target (``plan_for_speed``: per-group
widths, timed in onnxruntime at the batch size asked) twice: weighing the filter scores'
shares, and weighing the measured sensitivity (``measure_plan_sensitivity``: the loss rise
when one group alone is cut, BatchNorm re-estimated, on held-back training images). A
uniform ``--rate`` with the same measured speedup is then searched (bisection on the rate,
each candidate pruned and timed against the original, interleaved). All are fine-tuned by
``compress`` with the same budget (the README quick start's: 3 epochs on 10,000 real CIFAR-10
images, lr 0.02) and the written files' accuracy and speedup (``compress``'s own interleaved
measurement) are compared.

Usage (from the repository root)::

    python benchmarks/target_speedup_accuracy.py --data-root ../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _models import bench_on_budget
from _results import Run, default_out, md_table, write_results

import sfp_onnx
from sfp_onnx.data.datasets import DataConfig
from sfp_onnx.pipeline import CompressOptions
from sfp_onnx.runtime.bench import speedups
from sfp_onnx.speed_targets import SpeedSearch, plan_for_speed
from sfp_onnx.training.sfp import SfpConfig
from sfp_onnx.training.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "examples" / "resnet20_cifar10.onnx")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--target", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0, help="the fine-tunes' seed")
    parser.add_argument("--out", type=Path, default=default_out(False))
    parser.add_argument("--name", default="target_speedup_accuracy")
    parser.add_argument(
        "--arms", nargs="+", default=["sensitivity", "filters", "uniform"],
        choices=["sensitivity", "filters", "uniform"],
    )  # fmt: skip
    return parser.parse_args()


def uniform_rate_for(model: Path, speedup: float, batch: int, folder: Path) -> tuple[float, float]:
    """The uniform rate (round-to auto) whose pruned file runs ``speedup``x faster."""
    low, high, best = 0.0, 0.7, (0.0, 1.0)
    for index in range(6):
        rate = (low + high) / 2
        path = folder / f"uniform_{index}.onnx"
        sfp_onnx.prune(model, path, rate=rate, round_to="auto")
        report, _runs = bench_on_budget([model, path], batch, seconds=8)
        measured = speedups(report)[(str(path), batch)]
        print(f"uniform rate {rate:.3f}: {measured:.2f}x", flush=True)
        if abs(measured / speedup - 1) < abs(best[1] / speedup - 1):
            best = (rate, measured)
        low, high = (rate, high) if measured < speedup else (low, rate)
    return best


def fine_tune(model: Path, sfp: SfpConfig, args, folder: Path, name: str) -> dict:
    data = DataConfig("cifar10", root=args.data_root, train_limit=args.train_limit, seed=args.seed)
    training = TrainConfig(epochs=args.epochs, lr=args.lr, workers=0, seed=args.seed)
    options = CompressOptions(
        workdir=folder / f"{name}.work", bench_batch=args.batch, bench_runs=50
    )
    report = sfp_onnx.compress(
        model, folder / f"{name}.onnx", sfp=sfp, data=data, training=training, options=options
    )
    latency = report.extra["latency_ms"]
    return {
        "top1": report.extra["accuracy"]["after"],
        "top1_before": report.extra["accuracy"]["before"],
        "speedup": latency["before"] / latency["after"],
        "macs_kept": 1 - report.macs_reduction,
    }


def plan_arm(args, folder: Path, importance: str):
    """The speed plan weighing ``importance``, and the seconds its sensitivity took."""
    sensitivity = None
    if importance == "sensitivity":
        data = DataConfig("cifar10", root=args.data_root, train_limit=args.train_limit, seed=0)
        sensitivity = sfp_onnx.measure_plan_sensitivity(args.model, data, round_to="auto")
        print(f"sensitivity measured in {sensitivity.seconds:.0f} s", flush=True)
    plan, _points = plan_for_speed(
        args.model, target_speedup=args.target, round_to="auto", sensitivity=sensitivity,
        search=SpeedSearch(batch=args.batch, cache_dir=folder), progress=print,
    )  # fmt: skip
    return plan, sensitivity.seconds if sensitivity else 0.0


def main() -> None:
    args = parse_args()
    run = Run(args.name)
    rows, data = [], {"arms": {}}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        plans = {arm: plan_arm(args, folder, arm) for arm in args.arms if arm != "uniform"}
        for arm, (plan, seconds) in plans.items():
            sfp = SfpConfig(rate=plan.removed_share, plan=plan, round_to=plan.round_to)
            result = fine_tune(args.model, sfp, args, folder, arm)
            data["arms"][arm] = {**result, "sensitivity_seconds": seconds, "plan": plan.to_json()}
            weighed = "measured sensitivity" if arm == "sensitivity" else "filter scores"
            label = f"planned, weighing {weighed}"
            rows.append(_row(label, plan.measured["speedup"], result))
        if "uniform" in args.arms:
            goal = next(iter(plans.values()))[0].measured["speedup"] if plans else args.target
            rate, chosen = uniform_rate_for(args.model, goal, args.batch, folder)
            result = fine_tune(args.model, SfpConfig(rate=rate, round_to="auto"), args, folder,
                               "uniform")  # fmt: skip
            data["arms"]["uniform"] = {**result, "rate": rate}
            rows.append(_row(f"uniform rate {rate:.3f}", chosen, result))
    headers = ["widths", "speedup when chosen", "speedup of the file (compress)", "MACs kept",
               "top-1"]  # fmt: skip
    start = next(iter(data["arms"].values()))["top1_before"]
    body = (
        f"Target {args.target:g}× at batch {args.batch}; budget {args.epochs} epochs × "
        f"{args.train_limit} images, lr {args.lr}, seed {args.seed}; start {start:.2%}.\n\n"
        f"{md_table(headers, rows)}\n"
    )
    write_results(run, args.out, title="Planned vs uniform widths at equal measured speedup",
                  body=body, data=data)  # fmt: skip


def _row(label: str, chosen: float, result: dict) -> list[str]:
    return [label, f"{chosen:.2f}×", f"{result['speedup']:.2f}×", f"{result['macs_kept']:.1%}",
            f"{result['top1']:.2%}"]  # fmt: skip


if __name__ == "__main__":
    main()
