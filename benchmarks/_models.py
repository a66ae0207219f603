"""What the benchmarks share: the models they export, pruned variants, timing on a budget.

Models are named ``<name>@<size>``: ``resnet56@32`` is the CIFAR ResNet-56 of
:mod:`sfp_onnx.training.zoo`, ``resnet18@224`` a torchvision classifier (1000 classes, random
weights: latency does not depend on the values). Batch-norm statistics are randomised (seeded), so
folding them matters and exactness checks are not trivially met.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision
from torch import nn

import sfp_onnx
from sfp_onnx.runtime.bench import BenchConfig, BenchReport, benchmark
from sfp_onnx.runtime.target import cpu_flags, cpu_round_to
from sfp_onnx.training.zoo import create_cifar_resnet, create_cifar_vgg, export_onnx

__all__ = [
    "Pruned",
    "bench_on_budget",
    "create_model",
    "export_model",
    "fold_zoo_export",
    "nchwc_block",
    "nchwc_misses",
    "parse_spec",
    "prune_variant",
]

_CIFAR = {"resnet20": 20, "resnet56": 56, "resnet110": 110}


def parse_spec(spec: str) -> tuple[str, int]:
    """``"resnet50@224"`` -> ``("resnet50", 224)``."""
    name, _, size = spec.partition("@")
    return name, int(size or (32 if name in _CIFAR else 224))


def create_model(name: str, seed: int = 0) -> nn.Module:
    """A CIFAR ResNet (``resnet20/56/110``, 10 classes) or a torchvision model (1000 classes)."""
    torch.manual_seed(seed)
    if name in _CIFAR:
        model = create_cifar_resnet(_CIFAR[name])
    else:
        model = getattr(torchvision.models, name)(weights=None)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2, generator=gen)
                mod.running_var.uniform_(0.5, 1.5, generator=gen)
                mod.weight.uniform_(0.5, 1.5, generator=gen)
                mod.bias.uniform_(-0.2, 0.2, generator=gen)
    return model.eval()


def export_model(spec: str, folder: Path, *, fold_bn: bool = False) -> Path:
    """Export ``spec`` once into ``folder`` (reused when already there); returns the path."""
    name, size = parse_spec(spec)
    path = folder / f"{name}_{size}{'_fold' if fold_bn else ''}.onnx"
    if not path.exists():
        export_onnx(create_model(name), path, input_size=(3, size, size), fold_bn=fold_bn)
    return path


def fold_zoo_export(source: Path, path: Path) -> Path:
    """Re-export a trained zoo model (CIFAR ResNet or VGG) with every BatchNorm folded.

    The weights are read back from ``source``'s initializers (they keep the torch names), and
    the legacy exporter folds each Conv+BatchNorm, as it does by default for users' models.
    """
    import onnx
    from onnx import numpy_helper

    weights = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
        for t in onnx.load(str(source)).graph.initializer
    }
    if "features.0.weight" in weights:
        model = create_cifar_vgg()
    else:
        blocks = len({k.split(".")[1] for k in weights if k.startswith("layer1.")})
        model = create_cifar_resnet(6 * blocks + 2)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if [k for k in missing if not k.endswith("num_batches_tracked")] or unexpected:
        raise ValueError(f"{source} is not a zoo model ({missing[:3]}, {unexpected[:3]})")
    export_onnx(model, path, fold_bn=True)
    return path


@dataclass(frozen=True)
class Pruned:
    """One pruned variant of a model, as ``sfp_onnx.prune`` reported it."""

    path: Path
    rate: float
    rounding: str  # as asked: "none", a number, or "auto"
    round_to: int | None  # what it resolved to
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    realised: tuple[float, ...]  # realised rate of each slimmed group
    kept_channels: int
    prunable_channels: int
    exact: bool
    max_abs_diff: float
    seconds: float

    @property
    def macs_ratio(self) -> float:
        """MACs before / after: the speedup MACs alone would predict."""
        return self.macs_before / self.macs_after

    def to_json(self) -> dict:
        """Plain values for the results file."""
        return {
            "path": self.path.name,
            "rate": self.rate,
            "rounding": self.rounding,
            "round_to": self.round_to,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "realised_rate_min": min(self.realised, default=0.0),
            "realised_rate_max": max(self.realised, default=0.0),
            "kept_channels": self.kept_channels,
            "prunable_channels": self.prunable_channels,
            "exact": self.exact,
            "max_abs_diff": self.max_abs_diff,
            "seconds": self.seconds,
        }


def prune_variant(
    source: Path, folder: Path, rate: float, rounding: str, *, masked: bool = False
) -> Pruned:
    """``sfp_onnx.prune(source, rate, round_to=rounding)`` into ``folder``, timed."""
    round_to = None if rounding == "none" else rounding if rounding == "auto" else int(rounding)
    out = folder / f"{source.stem}_r{rate:g}_{rounding}.onnx"
    masked_path = folder / f"{out.stem}_masked.onnx" if masked else None
    started = time.perf_counter()
    report = sfp_onnx.prune(source, out, rate=rate, round_to=round_to, save_masked=masked_path)
    seconds = time.perf_counter() - started
    slimmed = [g for g in report.groups if g.kept < g.channels]
    prunable = [g for g in report.groups if g.prunable]
    return Pruned(
        path=out,
        rate=rate,
        rounding=rounding,
        round_to=report.settings["round_to"],
        macs_before=report.before.macs,
        macs_after=report.after.macs,
        params_before=report.before.params,
        params_after=report.after.params,
        realised=tuple(g.realised_rate for g in slimmed),
        kept_channels=sum(g.kept for g in prunable),
        prunable_channels=sum(g.channels for g in prunable),
        exact=report.verification.exact,
        max_abs_diff=report.verification.max_abs_diff,
        seconds=seconds,
    )


def nchwc_block() -> int:
    """Channels per block of onnxruntime's blocked CPU layout on this machine (16 or 8)."""
    return cpu_round_to(cpu_flags())


def nchwc_misses(path: Path, block: int) -> int:
    """Conv nodes that onnxruntime's NCHWc transformer leaves in the plain layout.

    Its rule (onnxruntime ``nchwc_transformer.cc``): a Conv goes blocked when its input
    channels are whole blocks (or fewer than one block, read directly, as in a stem), and a
    grouped Conv also needs whole blocks of output channels (depthwise: channels only). Each
    Conv left out costs layout conversions around it.
    """
    model = onnx.load(str(path))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    misses = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or len(shapes.get(node.input[1], ())) != 4:
            continue
        out_channels, in_per_group = shapes[node.input[1]][:2]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        in_channels = in_per_group * group
        if group == 1:
            misses += in_channels >= block and in_channels % block != 0
        elif in_per_group == 1 and out_channels == group:
            misses += out_channels % block != 0
        else:
            misses += bool(in_channels % block or (out_channels // group) % block)
    return misses


def bench_on_budget(
    paths: list[Path],
    batch: int,
    *,
    seconds: float,
    min_runs: int = 5,
    max_runs: int = 200,
    warmup: int = 3,
) -> tuple[BenchReport, int]:
    """Time ``paths`` interleaved at ``batch`` with as many runs as fit in ``seconds``.

    The first model is probed once to size the run count; pruned models are faster, so the
    real time stays near or under the budget. Returns the report and the runs per model.
    """
    probe = benchmark(paths[:1], BenchConfig(batch_sizes=(batch,), warmup=1, runs=2))
    per_run = probe.results[0].latency_ms["p50"] / 1e3
    runs = int(np.clip(seconds / (len(paths) * per_run * 0.8), min_runs, max_runs))
    config = BenchConfig(batch_sizes=(batch,), warmup=warmup, runs=runs)
    return benchmark(paths, config), runs
