"""The independent oracle of the surgery fuzzer: which channels an exact slim removes.

It walks the torch blocks of a :class:`tests.fuzz_models.FuzzNet` (each block's ``track``),
not the ONNX graph, with its own union-find of channel spaces and its own zero propagation,
reading the torch weights. A channel is *structurally zero* when it is 0 for every input by
construction: a conv row and bias of zeros; a BatchNorm whose scale and shift are zero, or
whose input is zero with zero mean and shift; 0 through an activation that maps 0 to 0, a
pool, or x·g. Channels joined by a residual Add or an SE Mul form one group; a group may
lose the channels that are zero at every conv/linear that reads them, but at least one
channel stays. Groups reaching the graph input or output keep every channel. So do both
sides of a residual Add or SE Mul between a concatenated tensor and a plain one: sfp-onnx
does not split a channel space to match a concatenation's segments, so it blocks such a
join and stops tracking its result (and blocks whatever later mixes with it); the oracle
does the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from tests.fuzz_models import FuzzNet

__all__ = [
    "Flow",
    "LayerShape",
    "Oracle",
    "bias_zero",
    "expected_layers",
    "norm_zero",
    "rows_zero",
]


@dataclass
class Flow:
    """What the oracle knows of one tensor: its channel segments and which are zero."""

    segments: tuple[tuple[int, int], ...]  # (space, length) along the channel axis
    zero: np.ndarray  # bool per channel
    block: int = 1  # positions per channel on the axis (H×W after a Flatten)


@dataclass(frozen=True)
class LayerShape:
    """A Conv or Linear in forward order: its weight shape before and after slimming."""

    op: str  # "Conv" | "Gemm"
    before: tuple[int, ...]
    after: tuple[int, ...]


@dataclass
class Oracle:
    """Channel spaces (union-find), blocks, reads and layers, collected in forward order."""

    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    blocked: set[int] = field(default_factory=set)
    reads: list[Flow] = field(default_factory=list)
    # (op, input flow or None, output space or None (depthwise), weight shape[, conv groups])
    layers: list[tuple] = field(default_factory=list)
    parts: dict[int, int] = field(default_factory=dict)  # space -> equal parts (grouped convs)
    producers: list[tuple[tuple[tuple[int, int], ...], nn.Module]] = field(default_factory=list)

    def new(self, size: int, blocked: bool = False) -> int:
        """A fresh channel space of ``size`` channels."""
        self.parent.append(len(self.parent))
        self.size.append(size)
        if blocked:
            self.blocked.add(len(self.parent) - 1)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        """The root space of ``space``'s group."""
        while self.parent[space] != space:
            space = self.parent[space]
        return space

    def block(self, *flows: Flow | None) -> None:
        """Every space of these flows keeps all its channels."""
        for flow in flows:
            if flow is not None:
                self.blocked.update(s for s, _ in flow.segments)

    def join(self, flows: Sequence[Flow | None], zero: np.ndarray | None) -> Flow | None:
        """An elementwise op over activations: unify the spaces, or block all and untrack."""
        lengths = {tuple(n for _, n in f.segments) if f else None for f in flows}
        if len(lengths) != 1 or None in lengths:
            self.block(*flows)
            return None
        for other in flows[1:]:
            for (a, _), (b, _) in zip(flows[0].segments, other.segments, strict=True):
                ra, rb = self.find(a), self.find(b)
                self.parent[max(ra, rb)] = min(ra, rb)
        return Flow(flows[0].segments, zero)

    def split_into_parts(self, flow: Flow | None, part_size: int) -> None:
        """A grouped conv reads or makes ``flow`` in runs of ``part_size``: each run loses the
        same count. A run straddling two concatenated segments blocks them (as sfp-onnx)."""
        if flow is None:
            return
        start = 0
        for _, length in flow.segments:
            if start % part_size or length % part_size:
                self.block(flow)
                return
            start += length
        for space, length in flow.segments:
            self.parts[space] = math.lcm(self.parts.get(space, 1), length // part_size)

    def group_parts(self, root: int) -> int:
        """The equal parts of ``root``'s group: the lcm over its spaces."""
        members = [s for s in range(len(self.size)) if self.find(s) == root]
        return math.lcm(*(self.parts.get(s, 1) for s in members))

    def roots(self) -> list[int]:
        """One space per group."""
        return sorted({self.find(s) for s in range(len(self.size))})

    def group_blocked(self, space: int) -> bool:
        """Whether ``space``'s group keeps all its channels."""
        root = self.find(space)
        return any(self.find(s) == root for s in self.blocked)

    def kept(self) -> dict[int, int]:
        """Channels each group (by root space) keeps after an exact slim."""
        used = {root: np.zeros(self.size[root], dtype=bool) for root in self.roots()}
        for flow in self.reads:
            start = 0
            for space, length in flow.segments:
                used[self.find(space)] |= ~flow.zero[start : start + length]
                start += length
        return {
            root: self.size[root]
            if self.group_blocked(root)
            else _kept(mask, self.group_parts(root))
            for root, mask in used.items()
        }


def _kept(used: np.ndarray, parts: int) -> int:
    """Channels kept when each of ``parts`` equal runs loses as many unused ones as the run
    with the fewest, and keeps at least one."""
    runs = (~used).reshape(parts, -1)
    removable = min(int(runs.sum(axis=1).min()), runs.shape[1] - 1)
    return used.size - parts * removable


def rows_zero(weight: torch.Tensor) -> np.ndarray:
    """Output channels whose weights are all zero."""
    return ~weight.detach().reshape(weight.shape[0], -1).numpy().any(axis=1)


def bias_zero(bias: torch.Tensor | None, channels: int) -> np.ndarray:
    """Channels with a zero (or no) bias."""
    return np.ones(channels, dtype=bool) if bias is None else bias.detach().numpy() == 0


def norm_zero(bn: nn.BatchNorm2d, x: np.ndarray) -> np.ndarray:
    """Channels a BatchNorm outputs as exactly zero, given which of its inputs are."""
    scale, shift, mean = (t.detach().numpy() for t in (bn.weight, bn.bias, bn.running_mean))
    return ((scale == 0) | (x & (mean == 0))) & (shift == 0)


def expected_layers(net: FuzzNet, kept: Mapping[int, int] | None = None) -> list[LayerShape]:
    """Every Conv/Linear weight shape, in forward order, before and after an exact slim.

    Args:
        net: the (soft-pruned) module.
        kept: channels each group keeps, by root space of :meth:`FuzzNet.trace`; default:
            those an exact slim keeps (:meth:`Oracle.kept`).
    """
    oracle = net.trace()
    kept = oracle.kept() if kept is None else kept

    def width(flow: Flow | None, original: int) -> int:
        if flow is None:
            return original
        return sum(kept[oracle.find(s)] for s, _ in flow.segments) * flow.block

    shapes = []
    for op, x, space, shape, *groups in oracle.layers:
        if isinstance(space, tuple) and space[0] == "units":  # rows in norm groups of n
            _, unit_space, n = space
            after = (kept[oracle.find(unit_space)] * n, width(x, shape[1]), *shape[2:])
        elif isinstance(space, tuple):  # an output read as two pieces (a channel split)
            after = (sum(kept[oracle.find(s)] for s in space), width(x, shape[1]), *shape[2:])
        elif space is None:  # depthwise: its channels are its input's
            after = (width(x, shape[0]), 1, *shape[2:])
        elif groups:  # grouped: weight dim 1 holds one convolution group's inputs
            inputs = width(x, shape[1] * groups[0]) // groups[0]
            after = (kept[oracle.find(space)], inputs, *shape[2:])
        else:
            after = (kept[oracle.find(space)], width(x, shape[1]), *shape[2:])
        shapes.append(LayerShape(op, shape, after))
    return shapes
