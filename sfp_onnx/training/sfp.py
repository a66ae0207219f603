"""Soft Filter Pruning on the imported torch module: the epoch-end step.

This module owns what SFP does between epochs (He et al., IJCAI 2018): score every index of
every prunable group from the current torch weights (summed over the coupled filters), pick
the lowest fraction, and zero those channels' filters in place. The tensors stay full size,
so the next epoch's updates may grow them back. As in the paper, an intermediate epoch zeroes
the filter rows (and their own biases) only: a following BatchNorm still adds its shift, which
is what lets gradients reach a zeroed filter through the ReLU after it (a channel that is
exactly 0 before a ReLU gets no gradient at all). After the last epoch every producer slice
of the chosen channels is zeroed (filters, biases, norm shifts and running means), so each is
exactly 0 everywhere and the surgery removes it without changing the output. The rate may
follow a schedule (constant as in SFP, or the asymptotic ramp of ASFP). Training itself is
:mod:`sfp_onnx.training.train`; scoring and choosing are shared with one-shot pruning in
:mod:`sfp_onnx.graph.soft_prune`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sfp_onnx.errors import UnsupportedModelError, UsageError
from sfp_onnx.graph.groups import ZEROED_KINDS, ChannelGroup
from sfp_onnx.graph.soft_prune import (
    CRITERIA,
    filter_rows,
    norm_factor,
    prune_count,
    score_group,
    scoring_tensors,
    select_channels,
)
from sfp_onnx.training.import_torch import ImportedModel

__all__ = ["SCHEDULES", "SfpConfig", "SoftFilterPruner", "rate_at"]

SCHEDULES = ("constant", "asymptotic")


@dataclass(frozen=True)
class SfpConfig:
    """How SFP prunes."""

    rate: float  # final fraction of each group's channels zeroed (the paper's P)
    criterion: str = "l2"  # l2 (SFP) | l1 | fpgm
    schedule: str = "constant"  # constant (SFP) | asymptotic (ASFP ramp to `rate`)
    round_to: int | str | None = None  # keep a multiple of K channels per group; "auto"
    independent_layers: bool = False  # reference code's per-layer choice (union at surgery)
    bn_recalibration: int = 50  # batches that re-estimate BN statistics after each zeroing


def rate_at(epoch: int, epochs: int, rate: float, schedule: str = "constant") -> float:
    """The pruning rate applied at the end of ``epoch`` (1-based) of ``epochs``.

    constant: ``rate`` every epoch (SFP). asymptotic: ``rate·(1 - exp(-k·epoch))`` with k such
    that 3/4 of the rate is reached a quarter of the way through (ASFP), and exactly ``rate``
    at the last epoch so the final masks have the requested width.
    """
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "constant" or epoch >= epochs:
        return rate
    k = 4.0 * math.log(4.0) / max(epochs, 1)
    return rate * (1.0 - math.exp(-k * epoch))


class SoftFilterPruner:
    """Zeroes the least important channels of each prunable group of an imported module."""

    def __init__(self, imported: ImportedModel, groups: Sequence[ChannelGroup], config: SfpConfig):
        self.imported = imported
        self.config = config
        self.groups = [g for g in groups if g.prunable and g.filters]
        missing = sorted(
            {p.tensor for g in self.groups for p in g.slices if p.kind in ZEROED_KINDS}
            - set(imported.links)
        )
        if missing:
            raise UnsupportedModelError(
                f"cannot train-prune: {len(missing)} weights are not trainable tensors after "
                f"import (e.g. {missing[0]!r})"
            )
        self.masks: dict[int, np.ndarray] = {}

    @torch.no_grad()
    def step(self, epoch: int, epochs: int) -> dict:
        """Choose and zero this epoch's channels; returns kept/total channel counts.

        At ``epoch == epochs`` the zeroing is exact (every producer slice), before it soft.
        """
        rate = rate_at(epoch, epochs, self.config.rate, self.config.schedule)
        final = epoch >= epochs
        arrays = self.imported.arrays(scoring_tensors(self.groups))
        masks = {}
        for group in self.groups:
            count = prune_count(group.channels, rate, self.config.round_to)
            if self.config.independent_layers:
                masks[group.id] = self._zero_per_layer(group, arrays, count, final)
            else:
                chosen = select_channels(score_group(group, arrays, self.config.criterion), count)
                self._zero(group, chosen, final)
                masks[group.id] = chosen
        self.masks = masks
        total = sum(g.channels for g in self.groups)
        zeroed = sum(len(m) for m in masks.values())
        return {"rate": rate, "kept_channels": total - zeroed, "channels": total}

    def _zero(
        self, group: ChannelGroup, chosen: np.ndarray, final: bool, layers: set[str] | None = None
    ) -> None:
        """Zero ``chosen`` channels: every producer slice if ``final``, else the filters only."""
        if chosen.size == 0:
            return
        layers = layers or {piece.node for piece in group.filters}
        for piece in group.slices:
            if piece.kind not in ZEROED_KINDS or (not final and piece.node not in layers):
                continue
            tensor = self.imported.tensor(piece.tensor)
            positions = piece.offset + (chosen[:, None] * piece.block + np.arange(piece.block))
            index = torch.as_tensor(positions.reshape(-1), device=tensor.device)
            tensor.index_fill_(piece.axis % tensor.dim(), index, 0.0)

    def _zero_per_layer(
        self, group: ChannelGroup, arrays: dict, count: int, final: bool
    ) -> np.ndarray:
        """The reference code's choice: each filter picks its own lowest-norm channels.

        Only channels every coupled filter chose can become exactly zero (the union of kept
        channels is what the surgery keeps); at the final epoch those get the exact zeroing.
        """
        common = None
        for piece in group.filters:
            rows = filter_rows(arrays[piece.tensor], piece, group.channels).astype(np.float64)
            factor = norm_factor(group, piece.node, arrays)
            if factor is not None and factor.size == group.channels:
                rows = rows * factor[:, None]
            chosen = select_channels(CRITERIA[self.config.criterion](rows), count)
            self._zero(group, chosen, final=False, layers={piece.node})
            common = set(chosen.tolist()) if common is None else common & set(chosen.tolist())
        shared = np.array(sorted(common or ()), dtype=np.int64)
        if final:
            self._zero(group, shared, final=True)
        return shared
