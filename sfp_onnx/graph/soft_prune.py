"""Soft pruning: score the channels of each group and zero the least important ones.

This module owns the pruning criteria (L2 and L1 filter norms, FPGM's distance to the
geometric median), the choice of how many channels of a group to zero (rate, rounding to a
multiple of K, never all) and the zeroing itself on ONNX initializers. The same scores and
choices drive one-shot ``prune`` and, every epoch, SFP training. Scores are per group index,
summed over every coupled filter, so the branches of a residual join zero the same channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from sfp_onnx.errors import UsageError
from sfp_onnx.graph.groups import ChannelGroup, ChannelSlice
from sfp_onnx.graph.zeros import masked_arrays

__all__ = [
    "CRITERIA",
    "filter_rows",
    "norm_factor",
    "prune_count",
    "ramp_count",
    "score_group",
    "scoring_tensors",
    "select_channels",
    "soft_prune_model",
]


def _l2(rows: np.ndarray) -> np.ndarray:
    return np.sqrt((rows.astype(np.float64) ** 2).sum(axis=1))


def _l1(rows: np.ndarray) -> np.ndarray:
    return np.abs(rows.astype(np.float64)).sum(axis=1)


def _fpgm(rows: np.ndarray) -> np.ndarray:
    """Sum of distances to the other filters: smallest near the geometric median."""
    rows = rows.astype(np.float64)
    sq = (rows**2).sum(axis=1)
    dist2 = np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0.0)
    return np.sqrt(dist2).sum(axis=1)


CRITERIA = {"l2": _l2, "l1": _l1, "fpgm": _fpgm}


def filter_rows(array: np.ndarray, piece: ChannelSlice, channels: int) -> np.ndarray:
    """The group's channels of one filter slice as a [channels, -1] matrix."""
    moved = np.moveaxis(array, piece.axis, 0)
    span = moved[piece.offset : piece.offset + channels * piece.block]
    return span.reshape(channels, -1)


# BatchNorm's epsilon is small against any live channel's variance; scoring uses the default.
_BN_EPSILON = 1e-5


def scoring_tensors(groups: Sequence[ChannelGroup]) -> list[str]:
    """The initializers :func:`score_group` reads: filters and the norms that follow them."""
    return sorted({p.tensor for g in groups for p in g.slices if p.kind == "filter" or p.follows})


def norm_factor(
    group: ChannelGroup, layer: str, arrays: Mapping[str, np.ndarray]
) -> np.ndarray | None:
    """|scale| / sqrt(var + eps) of the BatchNorm right after ``layer``, per channel, if any.

    A filter followed by a BatchNorm computes ``W·scale/sqrt(var)``: scoring that folded
    filter makes the choice the same whether the norm is a node or folded into the conv, and
    keeps a regrown filter (whose raw norm the norm divides away) from looking important.
    """
    scale = next((p for p in group.slices if p.follows == layer and p.kind == "scale"), None)
    if scale is None:
        return None
    var = next(
        (p for p in group.slices if p.node == scale.node and p.kind == "param" and p.follows),
        None,
    )
    if var is None or scale.tensor not in arrays or var.tensor not in arrays:
        return None
    gamma = np.abs(arrays[scale.tensor].astype(np.float64).reshape(-1))
    return gamma / np.sqrt(arrays[var.tensor].astype(np.float64).reshape(-1) + _BN_EPSILON)


def score_group(
    group: ChannelGroup, arrays: Mapping[str, np.ndarray], criterion: str = "l2"
) -> np.ndarray:
    """Importance of each channel index of ``group``, summed over its coupled filters.

    Each filter is scored as the model computes it, with a following BatchNorm folded in.
    """
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    score = np.zeros(group.channels, dtype=np.float64)
    for piece in group.filters:
        rows = filter_rows(arrays[piece.tensor], piece, group.channels).astype(np.float64)
        factor = norm_factor(group, piece.node, arrays)
        if factor is not None and factor.size == group.channels:
            rows = rows * factor[:, None]
        score += CRITERIA[criterion](rows)
    return score


def prune_count(channels: int, rate: float, round_to: int | None = None, parts: int = 1) -> int:
    """How many of ``channels`` to zero: ⌊rate·C⌋, adjusted so a multiple of K remain.

    With ``round_to`` K the kept count is rounded to the nearest multiple of K (at least K;
    a tie keeps the larger, so 12 of 16 stays 16 and 20 of 32 becomes 24 with K = 8); groups
    narrower than K are left whole. At least one channel is always kept.

    With ``parts`` P (a grouped convolution's groups), each of the P equal parts loses
    ⌊rate·C/P⌋ channels and keeps at least one, and the kept count is a multiple of
    lcm(K, P).
    """
    if not 0.0 <= rate < 1.0:
        raise UsageError(f"rate must be in [0, 1), got {rate}")
    per_part = channels // parts
    pruned = parts * int(np.floor(rate * per_part + 1e-9))
    step = math.lcm(round_to, parts) if round_to and round_to > 1 else parts
    if step > 1 and pruned:
        if channels < step:
            return 0
        kept = step * max(1, int(np.floor((channels - pruned) / step + 0.5)))
        pruned = channels - min(kept, channels)
    return min(pruned, channels - parts)


def ramp_count(
    channels: int, rate: float, target: float, round_to: int | None = None, parts: int = 1
) -> int:
    """How many of ``channels`` to zero at ``rate`` on a ramp that ends at ``target``.

    The unrounded count (one channel at a time), scaled so that at ``target`` it is exactly
    ``prune_count(channels, target, round_to, parts)``. Rounding every step of the ramp
    instead turns it into jumps: with K = 8 a 16-wide group stays whole until the rate
    passes 0.31 and then loses half its channels at once, a late one-shot cut (measured in
    benchmarks/results/sfp_design.md). Without rounding this is ``prune_count``.
    """
    final = prune_count(channels, target, round_to, parts)
    unrounded_final = prune_count(channels, target, None, parts)
    if unrounded_final == 0:
        return 0
    unrounded = prune_count(channels, min(rate, target), None, parts)
    scaled = unrounded * final / unrounded_final
    return parts * int(np.floor(scaled / parts + 0.5))


def select_channels(score: np.ndarray, count: int, parts: int = 1) -> np.ndarray:
    """Indices of the ``count`` lowest scores (ties broken by index), sorted.

    With ``parts`` P, the ``count / P`` lowest of each of the P equal consecutive parts.
    """
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if parts > 1:
        size = score.size // parts
        chosen = [p * size + select_channels(score[p * size : (p + 1) * size], count // parts)
                  for p in range(parts)]  # fmt: skip
        return np.concatenate(chosen).astype(np.int64)
    order = np.lexsort((np.arange(score.size), score))
    return np.sort(order[:count]).astype(np.int64)


def soft_prune_model(
    model: ir.Model,
    groups: Sequence[ChannelGroup],
    *,
    rate: float,
    criterion: str = "l2",
    round_to: int | None = None,
    counts: Mapping[int, int] | None = None,
) -> dict[int, np.ndarray]:
    """Zero the least important channels of every prunable group of ``model``, in place.

    ``counts`` (group id -> channels to zero, from a plan) replaces the rate where given.

    Returns:
        The zeroed channel indices per group id.
    """
    initializers = model.graph.initializers
    arrays = {name: initializers[name].const_value.numpy() for name in scoring_tensors(groups)}
    chosen: dict[int, np.ndarray] = {}
    for group in groups:
        if not group.prunable or not group.filters:
            continue
        count = prune_count(group.channels, rate, round_to, group.parts)
        if counts is not None:
            count = counts.get(group.id, 0)
        chosen[group.id] = select_channels(
            score_group(group, arrays, criterion), count, group.parts
        )
    for name, array in masked_arrays(model, groups, chosen).items():
        initializers[name].const_value = ir.tensor(array, name=name)
    return chosen
