"""Per-group widths for a budget: how many channels each group keeps to meet a MACs target.

This module owns the allocation. :class:`MacsModel` predicts the model's multiply-adds for
any choice of group widths from the analysis alone: every Conv/Gemm/MatMul costs its full
MACs times, for each of its weight's first two axes, the fraction of that axis the chosen
widths keep (output rows × input columns; a grouped conv's columns shrink by a G-th of what
its input group loses). :func:`allocate_widths` starts from every group whole and, one step
of ``lcm(round_to, parts)`` channels at a time, narrows the group whose step removes the least
filter importance per MAC saved (the scores :func:`~sfp_onnx.graph.soft_prune.score_group`
gives, as a fraction of the group's total, so layers of any scale compare), never below a
group's floor (``max_rate``), until the prediction meets the target. With a measured
sensitivity table (``costs``: group -> kept width -> how much the loss rises when that group
alone is cut to that width, from :mod:`sfp_onnx.training.sensitivity`) the importance removed
by a step is the rise it adds instead, interpolated between the widths measured. Uniform ``--rate``
pruning is the special case where every group keeps the same fraction; here a group that
costs little and matters much keeps more. What the written file really costs is measured
afterwards, never taken from the prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sfp_onnx.errors import UsageError
from sfp_onnx.graph.groups import Analysis, ChannelGroup
from sfp_onnx.graph.measure import LayerCost
from sfp_onnx.graph.soft_prune import score_group, scoring_tensors, select_channels

__all__ = ["Allocation", "MacsModel", "allocate_widths", "candidate_widths", "width_step"]

_WEIGHT_KINDS = frozenset({"filter", "input", "param"})


def width_step(group: ChannelGroup, round_to: int | None) -> int:
    """The kept width of ``group`` moves in steps of lcm(round_to, parts)."""
    return math.lcm(round_to or 1, group.parts)


def candidate_widths(
    group: ChannelGroup, round_to: int | None, max_rate: float, most: int | None = None
) -> list[int]:
    """The widths ``group`` may be cut to, widest first (``most``: at most that many, evenly
    spread from the floor to the widest cut; one is the floor)."""
    step = width_step(group, round_to)
    floor = _floor(group, round_to, max_rate)
    widths = list(range(group.channels - step, floor - 1, -step)) if floor < group.channels else []
    if most is not None and len(widths) > most:
        picks = np.linspace(len(widths) - 1, 0, most).round().astype(int)
        widths = [widths[i] for i in sorted(set(picks.tolist()))]
    return widths


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
    costs: Mapping[int, Mapping[int, float]] | None = None,
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
        costs: measured sensitivity per group id and kept width (see the module docstring);
            None weighs the filter scores. A group missing from it is never narrowed.
    """
    if not 0.0 < target_fraction <= 1.0:
        raise UsageError(f"the MACs target must be in (0, 1], got {target_fraction}")
    if not 0.0 <= max_rate < 1.0:
        raise UsageError(f"--max-rate must be in [0, 1), got {max_rate}")
    groups = [g for g in analysis.prunable_groups if g.filters]
    if costs is None:
        lost = _filter_importance(model, groups, criterion)
    else:
        measured = [g for g in groups if g.id in costs]
        lost = {g.id: _measured_importance(costs[g.id], g.channels) for g in measured}
    kept = {g.id: g.channels for g in groups}
    floors = {g.id: _floor(g, round_to, max_rate) for g in groups}
    target = target_fraction * macs_model.total
    current = macs_model.macs(kept)
    while current > target:
        best = None
        for group in groups:
            narrower = kept[group.id] - width_step(group, round_to)
            if narrower < floors[group.id] or group.id not in lost:
                continue
            saved = macs_model.saving(kept, group.id, narrower)
            if saved <= 0:
                continue
            cost = lost[group.id](narrower) - lost[group.id](kept[group.id])
            key = (cost / saved, -saved)  # equal cost per MAC (e.g. none): the bigger step
            if best is None or key < best[0]:
                best = (key, group.id, narrower, current - saved)
        if best is None:
            break
        _, gid, narrower, current = best
        kept[gid] = narrower
    current = _widen_within(groups, kept, lost, macs_model, target, current, round_to)
    return Allocation(kept, current, macs_model.total, target, current <= target)


def _widen_within(
    groups: Sequence[ChannelGroup],
    kept: dict[int, int],
    lost: Mapping[int, Callable[[int], float]],
    macs_model: MacsModel,
    target: float,
    current: float,
    round_to: int | None,
) -> float:
    """Give back steps the target still affords, most importance per MAC first.

    The narrowing stops at the first step below the target, and a step can be large (half
    a 16-channel group at ``round_to`` 8); widening what fits afterwards uses that slack.
    Returns the predicted MACs after.
    """
    while True:
        best = None
        for group in groups:
            wider = kept[group.id] + width_step(group, round_to)
            if wider > group.channels or group.id not in lost:
                continue
            added = macs_model.saving({**kept, group.id: wider}, group.id, kept[group.id])
            gain = lost[group.id](kept[group.id]) - lost[group.id](wider)
            if added <= 0 or gain <= 0 or current + added > target:
                continue
            if best is None or gain / added > best[0]:
                best = (gain / added, group.id, wider, current + added)
        if best is None:
            return current
        _, gid, wider, current = best
        kept[gid] = wider


def _floor(group: ChannelGroup, round_to: int | None, max_rate: float) -> int:
    """The narrowest width allowed: (1 - max_rate)·C rounded up to a step, at least a step."""
    step = width_step(group, round_to)
    if group.channels < step:
        return group.channels
    return max(step, step * math.ceil((1.0 - max_rate) * group.channels / step - 1e-9))


def _filter_importance(
    model: ir.Model, groups: Sequence[ChannelGroup], criterion: str
) -> dict[int, Callable[[int], float]]:
    """Per group: width -> the share of its filter importance that width removes."""
    initializers = model.graph.initializers
    arrays = {n: initializers[n].const_value.numpy() for n in scoring_tensors(groups)}
    out = {}
    for group in groups:
        score = score_group(group, arrays, criterion)
        total = float(score.sum())

        def share(kept: int, score=score, total=total, group=group) -> float:
            removed = select_channels(score, group.channels - kept, group.parts)
            return float(score[removed].sum()) / total if total > 0 else 0.0

        out[group.id] = share
    return out


def _measured_importance(costs: Mapping[int, float], channels: int) -> Callable[[int], float]:
    """Width -> measured loss rise, never falling as the width shrinks (the whole group: 0),
    linear between the widths measured, and flat beyond the narrowest."""
    points = sorted({int(w): float(c) for w, c in costs.items() if int(w) < channels}.items(),
                    reverse=True)  # fmt: skip
    widths, rises, highest = [channels], [0.0], 0.0
    for width, rise in points:  # measurement noise must not make a narrower cut look cheaper
        highest = max(highest, rise)
        widths.append(width)
        rises.append(highest)
    xs, ys = np.asarray(widths[::-1], float), np.asarray(rises[::-1], float)
    return lambda kept: float(np.interp(kept, xs, ys))
