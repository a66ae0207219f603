"""What soft pruning costs on top of training: a pruning epoch vs a plain torch epoch.

The same module (a CIFAR ResNet exported to ONNX and imported back into torch, as
``compress`` does) trains one epoch on the same real CIFAR-10 images, alternately:

- plain: a bare torch loop (SGD with Nesterov momentum, cross entropy) over the same
  pre-decoded tensors and batch augmentation, nothing else — the compute limit;
- no pruning: :func:`sfp_onnx.training.train.train` alone (its loop, data path, checkpoint);
- soft-mask: :func:`sfp_onnx.training.train.train` with ``compress``'s default pruner
  (:class:`sfp_onnx.training.soft_masks.SoftMaskPruner`: gates on every forward pass,
  re-selection every 16 steps) and the checkpoint;
- soft-mask + distillation: the same, with the input model as the teacher (one extra forward);
- sfp-paper: ``train`` with the paper's epoch-end step
  (:class:`sfp_onnx.training.sfp.PaperSfpPruner`).

All start from the same weights, read the same shuffled batches (same loader seed, loading
in-process) and run on the CPU. The time spent inside the hooks is measured separately.
Medians over alternating repeats.

Usage (from the repository root)::

    python benchmarks/sfp_overhead.py            # ~10 min on 2 cores
    python benchmarks/sfp_overhead.py --quick    # smoke run, into a scratch folder
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _results import Run, default_out, md_table, write_results
from torch.utils.data import Subset
from train_throughput import bare_epoch

from sfp_onnx.data.datasets import DataConfig, load_datasets
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.load import load_model
from sfp_onnx.training.hooks import TrainingHook
from sfp_onnx.training.import_torch import import_model
from sfp_onnx.training.objectives import Distillation, DistillConfig
from sfp_onnx.training.sfp import PaperSfpPruner, SfpConfig
from sfp_onnx.training.soft_masks import SoftMaskPruner
from sfp_onnx.training.train import TrainConfig, train
from sfp_onnx.training.zoo import create_cifar_resnet, export_onnx

FULL_EPOCH = 50_000  # CIFAR-10 training images
CIFAR10 = Path(
    os.environ.get(
        "SFP_ONNX_CIFAR10", Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
    )
)


def parse_args() -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=56, help="CIFAR ResNet depth (6n+2)")
    parser.add_argument("--images", type=int, default=512, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-root", type=Path, default=CIFAR10, help="CIFAR-10 ImageFolder")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="smoke run: ResNet-20, 256 images")
    args = parser.parse_args()
    if args.quick:
        args.depth, args.images, args.batch_size, args.repeats = 20, 256, 64, 1
    args.out = args.out or default_out(args.quick)
    return args


class Timed(TrainingHook):
    """Runs another hook and adds up the seconds spent in it."""

    def __init__(self, hook: TrainingHook) -> None:
        self.hook, self.name, self.seconds = hook, hook.name, 0.0

    def _timed(self, method: str, *args):
        started = time.perf_counter()
        result = getattr(self.hook, method)(*args)
        self.seconds += time.perf_counter() - started
        return result

    def start(self, steps_per_epoch: int, epochs: int) -> None:
        self._timed("start", steps_per_epoch, epochs)

    def after_step(self, step: int) -> None:
        self._timed("after_step", step)

    def epoch_end(self, epoch: int) -> dict:
        return self._timed("epoch_end", epoch)


COLUMNS = ["", "seconds", "img/s", "throughput / plain", "time vs plain", "in the hook (vs plain)"]
ARMS = ("no pruning", "soft-mask", "soft-mask + distillation", "sfp-paper")


def pruning_epoch(
    kind: str, imported, model, analysis, teacher, dataset, config, rate, workdir
) -> dict:
    """One epoch of ``train`` with the arm's hook; total, epoch and in-hook seconds."""
    if kind == "no pruning":  # the loop, the data path and the checkpoint alone
        result = train(imported.module, dataset, None, config, workdir=workdir)
        return {"total": result.seconds, "epoch": result.epochs[0].seconds, "hook": 0.0}
    if kind == "sfp-paper":
        hook = PaperSfpPruner(imported, list(analysis.groups), SfpConfig(rate, method="sfp-paper"))
    else:
        hook = SoftMaskPruner(imported, model, analysis, SfpConfig(rate=rate))
    timed = Timed(hook)
    objective = Distillation(teacher, DistillConfig()) if "distillation" in kind else None
    result = train(
        imported.module, dataset, None, config, workdir=workdir, hooks=[timed],
        objective=objective,
    )  # fmt: skip
    if isinstance(hook, SoftMaskPruner):
        hook.gates.remove()
    return {"total": result.seconds, "epoch": result.epochs[0].seconds, "hook": timed.seconds}


def main() -> None:
    """Run the benchmark and write its results."""
    args = parse_args()
    run = Run("sfp_overhead")
    torch.manual_seed(0)
    config = TrainConfig(
        epochs=1, batch_size=args.batch_size, lr=0.01, device="cpu", workers=0, seed=0
    )
    data = DataConfig(name="imagefolder", root=str(args.data_root), train_limit=args.images)
    dataset = load_datasets(data, (32, 32)).train
    times: dict[str, list] = {"plain": [], **{arm: [] for arm in ARMS}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(create_cifar_resnet(args.depth), path)
        model = load_model(path)
        analysis = analyze_model(model)
        imported, teacher = import_model(model), import_model(load_model(path)).module
        start = {k: v.clone() for k, v in imported.module.state_dict().items()}
        bare_epoch(imported.module, Subset(dataset, range(config.batch_size)), config, 1)  # warm-up
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
            order = list(times) if repeat % 2 == 0 else list(times)[::-1]
            for kind in order:
                imported.module.load_state_dict(start)
                torch.manual_seed(repeat)
                if kind == "plain":
                    times[kind].append(
                        bare_epoch(imported.module, dataset, config, config.seed + 1)
                    )
                    continue
                workdir = Path(tmp) / f"{kind}{repeat}".replace(" ", "_")
                record = pruning_epoch(
                    kind, imported, model, analysis, teacher, dataset, config, args.rate, workdir
                )
                times[kind].append(record)
    plain_s = statistics.median(times["plain"])
    medians = {
        arm: {k: statistics.median(r[k] for r in times[arm]) for k in ("total", "epoch", "hook")}
        for arm in ARMS
    }
    rows = [["plain torch epoch", f"{plain_s:.2f}", f"{args.images / plain_s:.0f}", "—", "—", "—"]]
    for arm, m in medians.items():
        rows.append([
            f"`train` + {arm} + checkpoint", f"{m['total']:.2f}",
            f"{args.images / m['total']:.0f}", f"{plain_s / m['total']:.3f}",
            f"{m['total'] / plain_s - 1:+.1%}", f"{m['hook']:.3f} ({m['hook'] / plain_s:.2%})",
        ])  # fmt: skip
    full = plain_s / args.images * FULL_EPOCH  # a whole CIFAR-10 epoch, extrapolated
    body = "\n".join(
        [
            f"CIFAR ResNet-{args.depth} (ONNX, imported into torch), {args.images} real CIFAR-10 "
            f"training images, batch {args.batch_size}, rate {args.rate}, CPU "
            f"({torch.get_num_threads()} torch threads), median of {args.repeats} alternating "
            "repeats (after one warm-up batch). The hook column is the time spent inside the "
            "pruner's own calls (scoring and re-selection); the gates' multiplications run "
            "inside the forward pass and count in the epoch.\n",
            md_table(COLUMNS, rows),
            f"\nA full CIFAR-10 epoch ({FULL_EPOCH:,} images) is ~{full:.0f} s of plain training "
            "at this speed.\n",
        ]
    )
    md, js = write_results(
        run, args.out, title="Soft pruning overhead: pruning epochs vs a plain torch epoch",
        body=body,
        data={
            "depth": args.depth, "images": args.images, "batch_size": args.batch_size,
            "rate": args.rate, "seconds": times, "median_plain_s": plain_s, "medians": medians,
            "overhead": {arm: m["total"] / plain_s - 1 for arm, m in medians.items()},
        },
    )  # fmt: skip
    print(f"wrote {md}, {js}")


if __name__ == "__main__":
    main()
