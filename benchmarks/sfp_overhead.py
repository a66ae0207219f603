"""What Soft Filter Pruning costs on top of training: one SFP epoch vs a plain torch epoch.

The same module (a CIFAR ResNet exported to ONNX and imported back into torch, as
``compress`` does) trains one epoch on the same real CIFAR-10 images twice, alternately:

- plain: a bare torch loop (SGD with Nesterov momentum, cross entropy), nothing else;
- SFP: :func:`sfp_onnx.training.train.train` with
  :class:`sfp_onnx.training.sfp.SoftFilterPruner` as the epoch-end hook, i.e. what ``compress`` runs
  per epoch (lr schedule, progress events, the pruning step and the checkpoint).

Both start from the same weights, read the same shuffled batches (same loader seed, loading
in-process) and run on the CPU. The overhead is split into the pruning step itself and the
rest (schedule, bookkeeping, checkpoint). Medians over alternating repeats.

Usage (from the repository root)::

    python benchmarks/sfp_overhead.py            # ~6 min on 2 cores
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
import torch.nn.functional as F
from _results import Run, default_out, md_table, write_results
from torch.utils.data import Subset

from sfp_onnx.data.datasets import DataConfig, create_loader, load_datasets
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.load import load_model
from sfp_onnx.training.import_torch import import_model
from sfp_onnx.training.sfp import SfpConfig, SoftFilterPruner
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


def plain_epoch(module: torch.nn.Module, dataset, config: TrainConfig) -> float:
    """One epoch of a bare torch loop with the optimizer settings of ``config``; seconds."""
    started = time.perf_counter()
    loader = create_loader(
        dataset, config.batch_size, shuffle=True, seed=config.seed + 1, workers=0, drop_last=True
    )
    optimizer = torch.optim.SGD(
        module.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    module.train()
    for images, targets in loader:
        loss = F.cross_entropy(module(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def sfp_epoch(imported, groups, dataset, config: TrainConfig, rate: float, workdir: Path) -> dict:
    """One epoch of ``train`` with the SFP hook; total, epoch and hook seconds."""
    pruner = SoftFilterPruner(imported, groups, SfpConfig(rate=rate))
    hook_seconds = []

    def hook(epoch: int, _module: torch.nn.Module) -> dict:
        started = time.perf_counter()
        result = pruner.step(epoch, config.epochs)
        hook_seconds.append(time.perf_counter() - started)
        return result

    result = train(imported.module, dataset, None, config, workdir=workdir, on_epoch_end=hook)
    return {"total": result.seconds, "epoch": result.epochs[0].seconds, "hook": hook_seconds[0]}


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
    plain, sfp = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(create_cifar_resnet(args.depth), path)
        model = load_model(path)
        groups = analyze_model(model).groups
        imported = import_model(model)
        start = {k: v.clone() for k, v in imported.module.state_dict().items()}
        plain_epoch(imported.module, Subset(dataset, range(config.batch_size)), config)  # warm-up
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
            for kind in ("plain", "sfp") if repeat % 2 == 0 else ("sfp", "plain"):
                imported.module.load_state_dict(start)
                torch.manual_seed(repeat)
                if kind == "plain":
                    plain.append(plain_epoch(imported.module, dataset, config))
                else:
                    workdir = Path(tmp) / f"run{repeat}"
                    sfp.append(sfp_epoch(imported, groups, dataset, config, args.rate, workdir))
    plain_s = statistics.median(plain)
    sfp_s = {k: statistics.median(s[k] for s in sfp) for k in ("total", "epoch", "hook")}
    loop = sfp_s["epoch"] - sfp_s["hook"] - plain_s  # train()'s loop against the bare one
    fixed = sfp_s["total"] - sfp_s["epoch"]  # setup and checkpoint, once per epoch
    full = plain_s / args.images * FULL_EPOCH  # a whole CIFAR-10 epoch, extrapolated
    rows = [
        ["plain torch epoch", f"{plain_s:.2f}", "—"],
        [
            "SFP epoch: `train` + SFP step + checkpoint",
            f"{sfp_s['total']:.2f}",
            f"{sfp_s['total'] / plain_s - 1:+.1%}",
        ],
        [
            "  the SFP step (score, choose, zero)",
            f"{sfp_s['hook']:.3f}",
            f"{sfp_s['hook'] / plain_s:+.2%}",
        ],
        [
            "  `train`'s loop beyond the bare loop (schedule, events; noise)",
            f"{loop:+.2f}",
            f"{loop / plain_s:+.1%}",
        ],
        ["  setup and checkpoint", f"{fixed:.2f}", f"{fixed / plain_s:+.1%}"],
    ]
    per_epoch = sfp_s["hook"] + fixed
    body = "\n".join(
        [
            f"CIFAR ResNet-{args.depth} (ONNX, imported into torch), {args.images} real CIFAR-10 "
            f"training images, batch {args.batch_size}, rate {args.rate}, CPU "
            f"({torch.get_num_threads()} torch threads), median of {args.repeats} alternating "
            "repeats (after one warm-up batch).\n",
            md_table(["", "seconds", "vs plain"], rows),
            f"\nThe SFP step and the checkpoint are paid once per epoch ({per_epoch:.2f} s here); "
            f"over a full CIFAR-10 epoch ({FULL_EPOCH:,} images, ~{full:.0f} s of plain training "
            f"at this speed) they would add {per_epoch / full:.3%}.\n",
        ]
    )
    md, js = write_results(
        run,
        args.out,
        title="SFP overhead: one SFP epoch vs a plain torch epoch",
        body=body,
        data={
            "depth": args.depth,
            "images": args.images,
            "batch_size": args.batch_size,
            "rate": args.rate,
            "plain_s": plain,
            "sfp_s": sfp,
            "median_plain_s": plain_s,
            "median_sfp_s": sfp_s,
            "overhead": sfp_s["total"] / plain_s - 1,
            "per_epoch_fixed_s": per_epoch,
            "full_epoch_overhead": per_epoch / full,
        },
    )
    print(f"wrote {md}, {js}")


if __name__ == "__main__":
    main()
