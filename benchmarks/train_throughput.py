"""Training throughput: ``compress``'s loop against a bare torch loop, and DDP scaling.

The same module (the shipped CIFAR ResNet-20, ONNX imported into torch as ``compress`` does)
trains on the same real CIFAR-10 images, decoded once into memory, at the same batch:

- bare loop: SGD with Nesterov momentum and cross entropy over the pre-decoded tensors with
  the same batch augmentation (pad-4 crops and flips as tensor ops), nothing else — the
  compute limit;
- ``train``: :func:`sfp_onnx.training.train.train` alone (its loop, data path, progress
  counters, checkpoint every epoch);
- ``train`` + soft-mask: the loop ``compress --no-distill`` runs (the default pruner's gates on
  every forward pass, re-selections, the checkpoint). Distillation's cost (one teacher forward
  per step) is measured in sfp_overhead.md.

Each arm runs two epochs; the second epoch's time shows that no image is decoded after the
first (the decoded set is reused). Arms alternate over repeats; medians are reported.

DDP scaling: the ``train`` + soft-mask epoch run by 1 process and by 2 gloo processes (one
torch thread each, ``torch.multiprocessing`` with a file rendezvous) on the CPU, the global
batch split between them.

Usage (from the repository root)::

    python benchmarks/train_throughput.py                 # ~12 min on 2 cores
    python benchmarks/train_throughput.py --quick         # smoke run, into a scratch folder
    python benchmarks/train_throughput.py --device cuda   # on a GPU machine (AMP, channels_last)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _results import Run, default_out, md_table, write_results

from sfp_onnx.data.datasets import DataConfig, load_datasets
from sfp_onnx.data.loaders import create_loader
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.load import load_model
from sfp_onnx.training.import_torch import import_model
from sfp_onnx.training.sfp import SfpConfig
from sfp_onnx.training.soft_masks import SoftMaskPruner
from sfp_onnx.training.train import TrainConfig, resolve_device, train

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "examples" / "resnet20_cifar10.onnx"
CIFAR10 = Path(os.environ.get("SFP_ONNX_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))
ARMS = ("bare loop", "train", "train + soft-mask")


def parse_args() -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-ddp", dest="ddp", action="store_false", help="skip the DDP rows")
    parser.add_argument("--data-root", type=Path, default=CIFAR10, help="CIFAR-10 ImageFolder")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 images, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = 512, 1
    args.out = args.out or default_out(args.quick)
    return args


def bare_epoch(module: torch.nn.Module, dataset, config: TrainConfig, seed: int) -> float:
    """One epoch of a bare torch loop with ``config``'s optimizer and precision; seconds."""
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda and config.channels_last else torch.preserve_format
    module.to(device=device, memory_format=memory_format)
    started = time.perf_counter()
    loader = create_loader(
        dataset, config.batch_size, shuffle=True, seed=seed, workers=0, drop_last=True,
        device=device,
    )  # fmt: skip
    optimizer = torch.optim.SGD(
        module.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda and config.amp else None
    module.train()
    for images, targets in loader:
        images = images.to(device, memory_format=memory_format)
        with autocast or contextlib.nullcontext():
            loss = F.cross_entropy(module(images), targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def train_epochs(kind: str, dataset, config: TrainConfig, workdir: Path) -> list[float]:
    """Seconds of each epoch of ``train`` (with the soft-mask pruner for that arm)."""
    model = load_model(MODEL)
    imported = import_model(model)
    hooks = []
    if kind == "train + soft-mask":
        hooks = [SoftMaskPruner(imported, model, analyze_model(model), SfpConfig(rate=0.3))]
    result = train(imported.module, dataset, None, config, workdir=workdir, hooks=hooks)
    return [epoch.seconds for epoch in result.epochs]


def measure_arms(args, dataset, config: TrainConfig, tmp: Path) -> dict[str, list[list[float]]]:
    """Per arm, per repeat: the seconds of epoch 1 and epoch 2."""
    times: dict[str, list[list[float]]] = {arm: [] for arm in ARMS}
    bare_module = import_model(load_model(MODEL)).module
    start = {k: v.clone() for k, v in bare_module.state_dict().items()}
    for repeat in range(args.repeats):
        order = ARMS if repeat % 2 == 0 else ARMS[::-1]
        for arm in order:
            print(f"repeat {repeat + 1}/{args.repeats}: {arm}", flush=True)
            torch.manual_seed(repeat)
            if arm == "bare loop":
                bare_module.load_state_dict(start)
                seconds = [bare_epoch(bare_module, dataset, config, seed) for seed in (1, 2)]
            else:
                workdir = tmp / f"{arm}{repeat}".replace(" ", "_").replace("+", "")
                seconds = train_epochs(arm, dataset, config, workdir)
            times[arm].append(seconds)
    return times


def _ddp_rank(rank: int, world: int, init: str, args, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        data = DataConfig(name="imagefolder", root=str(args.data_root), train_limit=args.images)
        dataset = load_datasets(data, (32, 32)).train
        config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.01, device="cpu", workers=0)
        workdir = Path(init).parent / f"ddp{world}"
        seconds = train_epochs("train + soft-mask", dataset, config, workdir)
        if rank == 0:
            results[world] = seconds[0]
    finally:
        dist.destroy_process_group()


def measure_ddp(args, tmp: Path) -> dict[int, float]:
    """Seconds of one ``train`` + soft-mask epoch with 1 and with 2 gloo processes."""
    with mp.Manager() as manager:
        results = manager.dict()
        for world in (1, 2):
            print(f"DDP: {world} process(es)", flush=True)
            init = tmp / f"rendezvous{world}"
            mp.spawn(_ddp_rank, args=(world, str(init), args, results), nprocs=world, join=True)
        return dict(results)


def _rows(times: dict, images: int) -> tuple[list[list[str]], dict]:
    medians = {arm: [statistics.median(r[e] for r in times[arm]) for e in (0, 1)] for arm in ARMS}
    bare = medians["bare loop"][1]
    rows = []
    for arm, (first, second) in medians.items():
        rows.append([
            arm, f"{first:.2f}", f"{second:.2f}", f"{images / second:.0f}",
            f"{bare / second:.3f}",
        ])  # fmt: skip
    return rows, medians


def main() -> None:
    """Run the benchmark and write its results."""
    args = parse_args()
    run = Run("train_throughput")
    config = TrainConfig(
        epochs=2, batch_size=args.batch_size, lr=0.01, device=args.device, workers=0, seed=0
    )
    data = DataConfig(name="imagefolder", root=str(args.data_root), train_limit=args.images)
    dataset = load_datasets(data, (32, 32)).train
    with tempfile.TemporaryDirectory() as tmp:
        times = measure_arms(args, dataset, config, Path(tmp))
        ddp = measure_ddp(args, Path(tmp)) if args.ddp and args.device == "cpu" else {}
    rows, medians = _rows(times, args.images)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    precision = "bf16 autocast, channels_last" if args.device == "cuda" else "float32"
    body = [
        f"Shipped CIFAR ResNet-20 (ONNX imported into torch), {args.images} real CIFAR-10 "
        f"training images decoded once into memory, batch {args.batch_size}, pad-4 crops and "
        f"flips in batches, {device} ({precision}, {torch.get_num_threads()} torch threads), "
        f"median of {args.repeats} alternating repeats. Throughput and the ratio are of epoch "
        "2 (epoch 1 of `train` includes its first-batch setup).\n",
        md_table(["", "epoch 1 s", "epoch 2 s", "img/s", "throughput / bare loop"], rows),
    ]
    if ddp:
        scaling = [
            [str(w), f"{s:.2f}", f"{args.images / s:.0f}", f"{ddp[1] / s:.2f}x"]
            for w, s in sorted(ddp.items())
        ]
        body += [
            "\nDDP on the CPU (gloo, one torch thread per process, global batch "
            f"{args.batch_size} split over the processes), one `train` + soft-mask epoch:\n",
            md_table(["processes", "epoch s", "img/s", "speedup"], scaling),
        ]
    md, js = write_results(
        run, args.out, title="Training throughput: compress's loop vs a bare torch loop",
        body="\n".join(body),
        data={
            "images": args.images, "batch_size": args.batch_size, "device": device,
            "precision": precision, "threads": torch.get_num_threads(), "seconds": times,
            "medians": medians, "ddp_seconds": ddp,
            "ratio_epoch2": {a: medians["bare loop"][1] / m[1] for a, m in medians.items()},
        },
    )  # fmt: skip
    print(f"wrote {md}, {js}")


if __name__ == "__main__":
    main()
