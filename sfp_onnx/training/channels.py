"""Channels of the imported module: choosing the weakest per group, and zeroing them for real.

This module owns the two operations both soft pruners share (the forward-masking default of
:mod:`sfp_onnx.training.soft_masks` and the paper's procedure in :mod:`sfp_onnx.training.sfp`):
score every index of every prunable group from the module's current weights and pick the
lowest ones (the same scores and counts one-shot ``prune`` uses, from
:mod:`sfp_onnx.graph.soft_prune`), and zero chosen channels in the torch tensors the ONNX
initializers are linked to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from sfp_onnx.errors import UnsupportedModelError
from sfp_onnx.graph.groups import ZEROED_KINDS, ChannelGroup
from sfp_onnx.graph.soft_prune import prune_count, score_group, scoring_tensors, select_channels
from sfp_onnx.training.import_torch import ImportedModel

__all__ = [
    "ArrayView",
    "check_linked",
    "choose_channels",
    "favour_kept",
    "mask_changes",
    "trainable_groups",
    "zero_channels",
]

# Turns the linked arrays into what the network computes with (e.g. folding in a BatchNorm
# inserted for training); scoring reads the result.
ArrayView = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def trainable_groups(groups: Sequence[ChannelGroup]) -> list[ChannelGroup]:
    """The groups soft pruning acts on: prunable, with filters to score."""
    return [g for g in groups if g.prunable and g.filters]


def check_linked(imported: ImportedModel, groups: Sequence[ChannelGroup]) -> None:
    """Raise :class:`UnsupportedModelError` when a slice to zero is not a trainable tensor."""
    needed = {p.tensor for g in groups for p in g.slices if p.kind in ZEROED_KINDS}
    missing = sorted(needed - set(imported.links))
    if missing:
        raise UnsupportedModelError(
            f"cannot train-prune: {len(missing)} weights are not trainable tensors after "
            f"import (e.g. {missing[0]!r})"
        )


def choose_channels(
    imported: ImportedModel,
    groups: Sequence[ChannelGroup],
    *,
    rate: float,
    criterion: str,
    round_to: int | None,
    view: ArrayView | None = None,
    counts: Mapping[int, int] | None = None,
    masked: Mapping[int, np.ndarray] | None = None,
    margin: float = 0.0,
) -> dict[int, np.ndarray]:
    """The lowest-scored ``prune_count`` indices of every group, from the current weights.

    ``counts`` (group id -> channels to choose, e.g. a plan's) replaces the rate's count.
    ``masked`` and ``margin``: the channels masked now, and the hysteresis of
    :func:`favour_kept`.
    """
    arrays = imported.arrays(scoring_tensors(groups))
    if view is not None:
        arrays = view(arrays)
    chosen = {}
    for group in groups:
        count = prune_count(group.channels, rate, round_to, group.parts)
        if counts is not None:
            count = counts.get(group.id, 0)
        score = score_group(group, arrays, criterion)
        if masked is not None:
            score = favour_kept(score, masked.get(group.id, np.zeros(0, np.int64)), margin)
        chosen[group.id] = select_channels(score, count, group.parts)
    return chosen


def favour_kept(score: np.ndarray, masked: np.ndarray, margin: float) -> np.ndarray:
    """``score`` with every channel not in ``masked`` raised by the factor ``1 + margin``.

    Hysteresis for a re-selection: a masked channel displaces a kept one only when its score
    is more than ``margin`` above it, so near-ties do not swap back and forth.
    """
    if margin == 0.0:
        return score
    favoured = score.astype(np.float64) * (1.0 + margin)
    favoured[masked] = score[masked]
    return favoured


@torch.no_grad()
def zero_channels(
    imported: ImportedModel,
    group: ChannelGroup,
    chosen: np.ndarray,
    *,
    kinds: frozenset[str] = ZEROED_KINDS,
    layers: set[str] | None = None,
) -> None:
    """Zero ``chosen`` channels of ``group`` in every linked slice of the given kinds.

    With the default kinds (filters, biases, norm shifts, running means) each chosen channel
    becomes exactly 0 everywhere it is read, which is what the surgery removes. ``layers``
    restricts the zeroing to slices of those nodes.
    """
    if chosen.size == 0:
        return
    for piece in group.slices:
        if piece.kind not in kinds or (layers is not None and piece.node not in layers):
            continue
        tensor = imported.tensor(piece.tensor)
        positions = piece.offset + (chosen[:, None] * piece.block + np.arange(piece.block))
        index = torch.as_tensor(positions.reshape(-1), device=tensor.device)
        tensor.index_fill_(piece.axis % tensor.dim(), index, 0.0)


def mask_changes(before: Mapping[int, np.ndarray], after: Mapping[int, np.ndarray]) -> dict:
    """How many channels a re-selection masked anew and how many it brought back."""
    masked = revived = 0
    for group, now in after.items():
        was = set(before.get(group, np.zeros(0, np.int64)).tolist())
        now_set = set(now.tolist())
        masked += len(now_set - was)
        revived += len(was - now_set)
    return {"masked": masked, "revived": revived}
