"""Measured sensitivity: how much the loss rises when one group alone is cut to a width.

This module owns ``--sensitivity`` (issue 14's measured importance). For every prunable group
and each candidate width, the group's weakest channels (the filter scores one-shot ``prune``
uses) are masked in the forward pass with :class:`~sfp_onnx.training.gates.ChannelGates`, every
BatchNorm's statistics are re-estimated on a few training batches (a pruned network's
statistics differ, and the fine-tune re-learns them first), and the cross-entropy on held-back
calibration images is compared with the whole network's, measured the same way. The weights
are never changed; each cut starts from the same statistics. The batches are drawn once, so
every cut sees the same images: differences between cuts are the cuts', not the sampling's.

:func:`~sfp_onnx.graph.allocate.allocate_widths` then narrows, per MAC saved, the group whose
next step adds the least measured rise: the network's own answer to which layers it needs,
where the filter scores only rank channels inside a group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from torch.utils.data import Dataset

from sfp_onnx.data.loaders import create_loader
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.soft_prune import score_group, scoring_tensors, select_channels
from sfp_onnx.training.channels import check_linked, trainable_groups
from sfp_onnx.training.gates import ChannelGates
from sfp_onnx.training.import_torch import import_model
from sfp_onnx.training.norms import recalibrate_batchnorm
from sfp_onnx.training.train import resolve_device

__all__ = ["Sensitivity", "SensitivityConfig", "measure_sensitivity"]

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SensitivityConfig:
    """How the sensitivity is measured.

    Attributes:
        calibration_images: held-back images the loss is measured on.
        norm_batches: training batches each cut's BatchNorm statistics are re-estimated on.
        batch_size: images per batch, for both.
        widths_per_group: candidate widths measured per group (evenly spread from the widest
            cut to the floor; the allocator interpolates between them).
        seed: which images are drawn.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    calibration_images: int = 512
    norm_batches: int = 2
    batch_size: int = 128
    widths_per_group: int = 6
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class Sensitivity:
    """The measured loss rise per group id and kept width, and how it was measured."""

    base_loss: float
    rises: dict[int, dict[int, float]]
    calibration_images: int
    norm_batches: int
    criterion: str
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "base_loss": self.base_loss,
            "rises": {str(g): {str(w): r for w, r in by.items()} for g, by in self.rises.items()},
            "calibration_images": self.calibration_images,
            "norm_batches": self.norm_batches,
            "criterion": self.criterion,
            "seconds": self.seconds,
            "settings": self.settings,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Sensitivity:
        rises = {
            int(g): {int(w): float(r) for w, r in by.items()} for g, by in data["rises"].items()
        }
        return cls(**{**data, "rises": rises})


def measure_sensitivity(
    model: ir.Model,
    train_set: Dataset,
    calibration_set: Dataset,
    widths: Mapping[int, Sequence[int]],
    *,
    criterion: str = "l2",
    config: SensitivityConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Sensitivity:
    """The loss rise of cutting each group of ``widths`` alone to each of its widths.

    Args:
        model: the normalised model (not changed).
        train_set: images for re-estimating BatchNorm statistics (augmented is fine).
        calibration_set: held-back images the loss is measured on.
        widths: group id -> the kept widths to measure.
        criterion: the filter score that picks which channels a width keeps.
        config: how many images and batches.
        progress: called with (cuts done, cuts in all).
    """
    config = config or SensitivityConfig()
    started = time.perf_counter()
    device = resolve_device(config.device)
    imported = import_model(model)
    imported.module.to(device)
    analysis = analyze_model(model)
    groups = [g for g in trainable_groups(analysis.groups) if widths.get(g.id)]
    check_linked(imported, groups)
    gates = ChannelGates(imported, model, analysis, groups)
    norm_images = config.norm_batches * config.batch_size
    norm_batches = _draw(train_set, config, norm_images, shuffle=True, device=device)
    calibration = _draw(
        calibration_set, config, config.calibration_images, shuffle=False, device=device
    )
    arrays = imported.arrays(scoring_tensors(groups))
    try:
        base = _loss(imported.module, norm_batches, calibration)
        total, done = sum(len(widths[g.id]) for g in groups), 0
        rises: dict[int, dict[int, float]] = {}
        for group in groups:
            score = score_group(group, arrays, criterion)
            for width in widths[group.id]:
                values = np.ones(group.channels, dtype=np.float32)
                values[select_channels(score, group.channels - width, group.parts)] = 0.0
                gates.set(group.id, values)  # every cut re-estimates the statistics afresh
                rises.setdefault(group.id, {})[int(width)] = (
                    _loss(imported.module, norm_batches, calibration) - base
                )
                done += 1
                if progress is not None:
                    progress(done, total)
            gates.set(group.id, np.ones(group.channels, dtype=np.float32))
    finally:
        gates.remove()
    images = sum(len(labels) for _, labels in calibration)
    return Sensitivity(
        base_loss=base, rises=rises, calibration_images=images, norm_batches=len(norm_batches),
        criterion=criterion, seconds=round(time.perf_counter() - started, 1),
        settings={"batch_size": config.batch_size, "widths_per_group": config.widths_per_group,
                  "seed": config.seed, "device": str(device)},
    )  # fmt: skip


def _draw(
    dataset: Dataset, config: SensitivityConfig, images: int, *, shuffle: bool, device
) -> Batches:
    """The first ``images`` images of ``dataset`` in batches, held so every cut sees them."""
    out, count = [], 0
    with torch.random.fork_rng():  # in-process augmentation draws from the global generator
        torch.manual_seed(config.seed)
        loader = create_loader(dataset, config.batch_size, shuffle=shuffle, seed=config.seed,
                               workers=0)  # fmt: skip
        for batch, labels in loader:
            if count >= images:
                break
            take = min(len(labels), images - count)
            out.append((batch[:take].to(device), labels[:take].to(device)))
            count += take
    return out


@torch.no_grad()
def _loss(module: nn.Module, norm_batches: Batches, calibration: Batches) -> float:
    """Mean cross-entropy on ``calibration`` after re-estimating BatchNorm on ``norm_batches``."""
    recalibrate_batchnorm(module, norm_batches, len(norm_batches))
    module.eval()
    total, count = 0.0, 0
    for images, labels in calibration:
        logits = module(images)
        total += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        count += len(labels)
    return total / max(count, 1)
