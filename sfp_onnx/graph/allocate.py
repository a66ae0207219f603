"""Per-group widths for a budget: how many channels each group keeps to meet a MACs target.

This module owns the allocation. :class:`MacsModel` predicts the model's multiply-adds for
any choice of group widths from the analysis alone: every Conv/Gemm/MatMul costs its full
MACs times, for each of its weight's first two axes, the fraction of that axis the chosen
widths keep (output rows × input columns; a grouped conv's columns shrink by a G-th of what
its input group loses). :func:`allocate_widths` starts from every group whole and, one step
of ``lcm(round_to, parts)`` channels at a time, narrows the group whose step removes the least
filter importance per MAC saved (the scores :func:`~sfp_onnx.graph.soft_prune.score_group`
gives, as a fraction of the group's total, so layers of any scale compare), never below a
group's floor (``max_rate``), until the prediction meets the target. Uniform ``--rate``
pruning is the special case where every group keeps the same fraction; here a group that
costs little and matters much keeps more. What the written file really costs is measured
afterwards, never taken from the prediction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sfp_onnx.errors import UsageError
from sfp_onnx.graph.groups import Analysis, ChannelGroup
from sfp_onnx.graph.measure import LayerCost
from sfp_onnx.graph.soft_prune import score_group, scoring_tensors, select_channels

__all__ = ["Allocation", "MacsModel", "allocate_widths", "width_step"]

_WEIGHT_KINDS = frozenset({"filter", "input", "param"})


def width_step(group: ChannelGroup, round_to: int | None) -> int:
    """The kept width of ``group`` moves in steps of lcm(round_to, parts)."""
    return math.lcm(round_to or 1, group.parts)


@dataclass(frozen=True)
class _Axis:
    """One weight axis of a layer: its size and which groups it holds (group, positions each)."""

    size: int
    groups: tuple[tuple[int, float], ...]


class MacsModel:
    """Predicted MACs of the model for any group widths (see the module docstring)."""

    def __init__(self, model: ir.Model, analysis: Analysis, layers: Sequence[LayerCost]) -> None:
        self.channels = {g.id: g.channels for g in analysis.groups}
        nodes = {node.name: node for node in model.graph}
        by_tensor: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for group in analysis.prunable_groups:
            for piece in group.slices:
                if piece.kind in _WEIGHT_KINDS:
                    share = piece.block / piece.row_groups
                    by_tensor.setdefault((piece.tensor, piece.axis), []).append((group.id, share))
        self.total = sum(layer.macs for layer in layers)
        self.layers: list[tuple[int, tuple[_Axis, ...]]] = []
        for layer in layers:
            node = nodes.get(layer.name)
            weight = node.inputs[1] if node is not None and len(node.inputs) > 1 else None
            if weight is None or weight.const_value is None or not layer.macs:
                continue
            shape = weight.const_value.shape
            axes = tuple(
                _Axis(shape[a], tuple(by_tensor.get((weight.name, a), ())))
                for a in range(min(2, len(shape)))
            )
            if any(axis.groups for axis in axes):
                self.layers.append((layer.macs, axes))
        self.fixed = self.total - sum(macs for macs, _ in self.layers)
        self.touching: dict[int, list[int]] = {}  # group -> the layers whose cost it scales
        for index, (_, axes) in enumerate(self.layers):
            for gid in {g for axis in axes for g, _ in axis.groups}:
                self.touching.setdefault(gid, []).append(index)

    def macs(self, kept: Mapping[int, int]) -> float:
        """Predicted MACs when group ``g`` keeps ``kept[g]`` channels (missing: all)."""
        return self.fixed + sum(self._layer(i, kept) for i in range(len(self.layers)))

    def saving(self, kept: Mapping[int, int], group: int, narrower: int) -> float:
        """MACs saved by narrowing ``group`` from ``kept[group]`` to ``narrower`` channels."""
        trial = {**kept, group: narrower}
        return sum(
            self._layer(i, kept) - self._layer(i, trial) for i in self.touching.get(group, ())
        )

    def _layer(self, index: int, kept: Mapping[int, int]) -> float:
        macs, axes = self.layers[index]
        factor = 1.0
        for axis in axes:
            removed = sum(
                (self.channels[g] - kept.get(g, self.channels[g])) * share
                for g, share in axis.groups
            )
            factor *= max(axis.size - removed, 0.0) / axis.size
        return macs * factor


@dataclass(frozen=True)
class Allocation:
    """The widths chosen for a target, and what the model predicts for them.

    Attributes:
        kept: group id -> channels kept (every prunable, trainable group).
        predicted_macs: the MacsModel's MACs for these widths.
        full_macs: the MACs with every group whole.
        target_macs: the MACs asked for.
        reached: False when every group is at its floor and the target is still above.
    """

    kept: dict[int, int]
    predicted_macs: float
    full_macs: int
    target_macs: float
    reached: bool


def allocate_widths(
    model: ir.Model,
    analysis: Analysis,
    macs_model: MacsModel,
    *,
    target_fraction: float,
    round_to: int | None = None,
    max_rate: float = 0.7,
    criterion: str = "l2",
) -> Allocation:
    """Greedy widths that bring the predicted MACs to ``target_fraction`` of the full model's.

    Args:
        model: the normalised model (its weights give the importance scores).
        analysis: its channel groups.
        macs_model: the cost model for ``model``.
        target_fraction: MACs to keep, as a fraction of the full model's, in (0, 1].
        round_to: kept widths are multiples of this (and of a grouped conv's parts).
        max_rate: no group loses more than this fraction of its channels.
        criterion: the filter score (``l2``, ``l1``, ``fpgm``).
    """
    if not 0.0 < target_fraction <= 1.0:
        raise UsageError(f"the MACs target must be in (0, 1], got {target_fraction}")
    if not 0.0 <= max_rate < 1.0:
        raise UsageError(f"--max-rate must be in [0, 1), got {max_rate}")
    groups = [g for g in analysis.prunable_groups if g.filters]
    initializers = model.graph.initializers
    arrays = {n: initializers[n].const_value.numpy() for n in scoring_tensors(groups)}
    scores = {g.id: score_group(g, arrays, criterion) for g in groups}
    kept = {g.id: g.channels for g in groups}
    floors = {g.id: _floor(g, round_to, max_rate) for g in groups}
    target = target_fraction * macs_model.total
    current = macs_model.macs(kept)
    while current > target:
        best = None
        for group in groups:
            step = width_step(group, round_to)
            narrower = kept[group.id] - step
            if narrower < floors[group.id]:
                continue
            saved = macs_model.saving(kept, group.id, narrower)
            if saved <= 0:
                continue
            lost = _importance_lost(scores[group.id], group, narrower) - _importance_lost(
                scores[group.id], group, kept[group.id]
            )
            ratio = lost / saved
            if best is None or ratio < best[0]:
                best = (ratio, group.id, narrower, current - saved)
        if best is None:
            break
        _, gid, narrower, current = best
        kept[gid] = narrower
    return Allocation(kept, current, macs_model.total, target, current <= target)


def _floor(group: ChannelGroup, round_to: int | None, max_rate: float) -> int:
    """The narrowest width allowed: (1 - max_rate)·C rounded up to a step, at least a step."""
    step = width_step(group, round_to)
    if group.channels < step:
        return group.channels
    return max(step, step * math.ceil((1.0 - max_rate) * group.channels / step - 1e-9))


def _importance_lost(score: np.ndarray, group: ChannelGroup, kept: int) -> float:
    """The share of the group's importance in the channels a width of ``kept`` removes."""
    removed = select_channels(score, group.channels - kept, group.parts)
    total = float(score.sum())
    return float(score[removed].sum()) / total if total > 0 else 0.0
