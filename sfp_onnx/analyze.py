"""Channel analysis: which channels of which tensors must be kept or removed together.

This module owns the shared vocabulary of sfp-onnx, the :class:`ChannelGroup`, and the driver
that builds groups from a normalised :class:`onnx_ir.Model`. It walks the graph once in
topological order; every op type maps to one handler in :mod:`sfp_onnx._channel_rules` that
says how the op moves channels (creates a space, passes it on, joins spaces, reads it, or
blocks it). Spaces joined by elementwise ops are merged with a union-find; each final class is
one group. A group is prunable when nothing blocks it and, with its producer slices zeroed,
every consumer sees exact zeros (checked with :mod:`sfp_onnx.zeros`). Soft pruning, the FLOPs
count and the surgery only read the groups, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

__all__ = [
    "Analysis",
    "ChannelGroup",
    "ChannelSlice",
    "CountDependency",
    "Layout",
    "SliceKind",
    "analyze_model",
]

SliceKind = Literal["filter", "bias", "mean", "scale", "param", "input"]
# filter: rows that create a channel (Conv weight dim 0, Gemm output rows): scored and zeroed.
# bias: additive per-channel terms after it (conv bias, BN shift, added constants): zeroed.
# mean: a BatchNorm's running mean: zeroed, so a zero channel leaves the norm as exactly 0.
# scale: a norm's scale: kept, so a zeroed filter still gets gradients and can grow back.
# param: per-channel values that need no zeroing (BN variance, PRelu slope, depthwise weights).
# input: where a consumer reads the channel (Conv weight dim 1, Gemm input columns).
ZEROED_KINDS: frozenset[str] = frozenset({"filter", "bias", "mean"})


@dataclass(frozen=True)
class ChannelSlice:
    """Where the channels of a group live in one initializer.

    Group index ``i`` occupies positions ``offset + i*block`` to ``offset + (i+1)*block - 1``
    along ``axis`` of initializer ``tensor`` (``block`` > 1 after a Flatten: the C×H×W columns
    of a Gemm). ``follows`` names, for a BatchNorm's parameters, the layer whose output the
    norm reads directly, so scoring can see that layer's filters as the model computes them.
    """

    tensor: str
    axis: int
    offset: int
    block: int
    kind: SliceKind
    node: str
    follows: str | None = None


@dataclass(frozen=True)
class CountDependency:
    """A number in the graph that counts a group's channels (times ``per_channel``).

    Either attribute ``attribute`` of ``node`` (a depthwise Conv's ``group``) or entry
    ``position`` of the integer initializer ``tensor`` (a Reshape target, Resize sizes).
    """

    node: str
    attribute: str | None
    tensor: str | None
    position: int
    per_channel: int


@dataclass(frozen=True)
class ConsumerPoint:
    """A node that mixes channels reads a group at value ``value``, positions [start, stop)."""

    node: str
    value: str
    start: int
    stop: int


@dataclass(frozen=True)
class ChannelGroup:
    """A set of channel indices 0..C-1 that are kept or removed together.

    Attributes:
        id: position in :attr:`Analysis.groups`.
        channels: C, the number of channels.
        slices: every initializer slice that holds the group's channels.
        counts: numbers elsewhere in the graph that count these channels.
        layers: the nodes whose filters create the channels (one per coupled branch).
        consumers: where channel-mixing nodes read the channels.
        blocked: why the group cannot be pruned; ``None`` when it can.
    """

    id: int
    channels: int
    slices: tuple[ChannelSlice, ...]
    counts: tuple[CountDependency, ...]
    layers: tuple[str, ...]
    consumers: tuple[ConsumerPoint, ...]
    blocked: str | None = None

    @property
    def prunable(self) -> bool:
        """True when the group's channels can be removed."""
        return self.blocked is None

    @property
    def filters(self) -> tuple[ChannelSlice, ...]:
        """The producer slices a pruning criterion scores."""
        return tuple(s for s in self.slices if s.kind == "filter")


@dataclass(frozen=True)
class Layout:
    """How a tensor's channel axis maps onto groups.

    The channel axis ``axis`` (of a tensor of rank ``rank``) is a concatenation of
    ``segments`` (group or space id, length); each channel spans ``block`` consecutive
    positions (1, except after a Flatten where it spans H×W).
    """

    axis: int
    rank: int
    segments: tuple[tuple[int, int], ...]
    block: int = 1

    @property
    def channels(self) -> int:
        """Total channels on the axis."""
        return sum(length for _, length in self.segments)

    def offsets(self) -> list[tuple[int, int, int]]:
        """(space, start, length) for each segment, start in channels."""
        out, start = [], 0
        for space, length in self.segments:
            out.append((space, start, length))
            start += length
        return out


@dataclass(frozen=True)
class Analysis:
    """The result of :func:`analyze_model`: groups and every tensor's channel layout."""

    groups: tuple[ChannelGroup, ...]
    layouts: Mapping[str, Layout] = field(repr=False)

    @property
    def prunable_groups(self) -> tuple[ChannelGroup, ...]:
        """The groups that can be pruned."""
        return tuple(g for g in self.groups if g.prunable)


class _SpaceRecords:
    """Mutable per-space bookkeeping during the walk, merged into groups at the end."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.slices: list[list[ChannelSlice]] = []
        self.counts: list[list[CountDependency]] = []
        self.layers: list[list[str]] = []
        self.consumers: list[list[ConsumerPoint]] = []
        self.blocked: list[list[str]] = []

    def new(self, size: int) -> int:
        for lst in (self.slices, self.counts, self.layers, self.consumers, self.blocked):
            lst.append([])
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class AnalysisContext:
    """What a channel rule may read and record while the graph is walked.

    Rules get the node and this context; they read layouts and constants, and record slices,
    count dependencies, consumers, joins and blocks. See :mod:`sfp_onnx._channel_rules`.
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.spaces = _SpaceRecords()
        self.layouts: dict[str, Layout] = {}

    # --- reading -------------------------------------------------------------------------
    def layout(self, value: ir.Value | None) -> Layout | None:
        """The channel layout of a value, or None if it carries no tracked channels."""
        return None if value is None else self.layouts.get(value.name)

    @staticmethod
    def const(value: ir.Value | None) -> np.ndarray | None:
        """The value of an initializer input, or None for runtime tensors."""
        if value is None or value.const_value is None:
            return None
        return value.const_value.numpy()

    @staticmethod
    def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
        """The value's shape when every dimension is known, else None."""
        if value is None or value.shape is None:
            return None
        dims = tuple(value.shape)
        return dims if all(isinstance(d, int) for d in dims) else None

    @staticmethod
    def rank(value: ir.Value | None) -> int | None:
        """The value's rank when known."""
        return None if value is None or value.shape is None else len(value.shape)

    # --- recording -----------------------------------------------------------------------
    def set_layout(self, value: ir.Value | None, layout: Layout | None) -> None:
        """Attach a layout to a node output."""
        if value is not None and layout is not None:
            self.layouts[value.name] = layout

    def new_space(self, size: int, layer: str) -> int:
        """A fresh channel space created by ``layer`` (a Conv, Gemm, MatMul...)."""
        space = self.spaces.new(size)
        self.spaces.layers[space].append(layer)
        return space

    def add_slices(
        self,
        layout: Layout,
        tensor: ir.Value,
        axis: int,
        kind: SliceKind,
        node: ir.Node,
        follows: str | None = None,
    ) -> None:
        """Record that ``tensor``'s ``axis`` runs over the channels of ``layout``."""
        for space, start, _ in layout.offsets():
            self.spaces.slices[space].append(
                ChannelSlice(
                    tensor=tensor.name,
                    axis=axis,
                    offset=start * layout.block,
                    block=layout.block,
                    kind=kind,
                    node=node.name,
                    follows=follows,
                )
            )

    def add_count(
        self,
        layout: Layout,
        node: ir.Node,
        *,
        attribute: str | None = None,
        tensor: ir.Value | None = None,
        position: int = 0,
        per_channel: int = 1,
    ) -> None:
        """Record a number that counts ``layout``'s channels (it shrinks with them)."""
        for space, _, _ in layout.offsets():
            self.spaces.counts[space].append(
                CountDependency(
                    node=node.name,
                    attribute=attribute,
                    tensor=None if tensor is None else tensor.name,
                    position=position,
                    per_channel=per_channel,
                )
            )

    def add_consumer(self, layout: Layout, node: ir.Node, value: ir.Value) -> None:
        """Record that ``node`` mixes the channels of ``value``: they must be zero to go."""
        for space, start, length in layout.offsets():
            self.spaces.consumers[space].append(
                ConsumerPoint(node=node.name, value=value.name, start=start, stop=start + length)
            )

    def join(self, a: Layout, b: Layout) -> bool:
        """Unify two layouts segment by segment; False when their structures differ."""
        if [n for _, n in a.segments] != [n for _, n in b.segments]:
            return False
        for (sa, _), (sb, _) in zip(a.segments, b.segments, strict=True):
            self.spaces.union(sa, sb)
        return True

    def block(self, layout: Layout | None, reason: str) -> None:
        """Mark every space of ``layout`` as not prunable, with the reason."""
        if layout is None:
            return
        for space, _ in layout.segments:
            self.spaces.blocked[space].append(reason)

    def block_inputs(self, node: ir.Node, reason: str) -> None:
        """Block every tracked input of ``node``."""
        for value in node.inputs:
            self.block(self.layout(value), reason)


def analyze_model(model: ir.Model) -> Analysis:
    """Build the channel groups of a normalised model (see :func:`sfp_onnx.load.load_model`).

    Graph inputs and outputs block their groups (the interface keeps its shape); every op
    without a rule blocks the channels it reads.
    """
    from sfp_onnx._channel_rules import RULES, block_unknown
    from sfp_onnx.zeros import first_nonzero_consumers

    ctx = AnalysisContext(model)
    for value in model.graph.inputs:
        _track_graph_input(ctx, value)
    for node in model.graph:
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        (rule or block_unknown)(node, ctx)
    for value in model.graph.outputs:
        ctx.block(ctx.layout(value), f"reaches graph output {value.name!r}")
    groups, space_to_group = _collect_groups(ctx)
    layouts = {name: _resolve(layout, space_to_group) for name, layout in ctx.layouts.items()}
    analysis = Analysis(groups=tuple(groups), layouts=layouts)
    leaks = first_nonzero_consumers(model, analysis)
    if leaks:
        groups = [
            _with_block(g, f"masked channels do not stay zero: {leaks[g.id]}")
            if g.id in leaks
            else g
            for g in groups
        ]
        analysis = Analysis(groups=tuple(groups), layouts=layouts)
    return analysis


def _track_graph_input(ctx: AnalysisContext, value: ir.Value) -> None:
    rank = ctx.rank(value)
    shape = value.shape
    if rank is None or rank < 2 or not isinstance(shape[1], int):
        return
    space = ctx.spaces.new(shape[1])
    ctx.spaces.blocked[space].append(f"channels of graph input {value.name!r}")
    ctx.set_layout(value, Layout(axis=1, rank=rank, segments=((space, shape[1]),)))


def _collect_groups(ctx: AnalysisContext) -> tuple[list[ChannelGroup], dict[int, int]]:
    spaces = ctx.spaces
    members: dict[int, list[int]] = {}
    for space in range(len(spaces.parent)):
        members.setdefault(spaces.find(space), []).append(space)
    groups: list[ChannelGroup] = []
    space_to_group: dict[int, int] = {}
    for root in sorted(members):
        group_id = len(groups)
        ids = members[root]
        sizes = {spaces.size[s] for s in ids}
        reasons = [r for s in ids for r in spaces.blocked[s]]
        if len(sizes) > 1:
            reasons.append(f"joined channel counts differ ({sorted(sizes)})")
        for s in ids:
            space_to_group[s] = group_id
        groups.append(
            ChannelGroup(
                id=group_id,
                channels=spaces.size[root],
                slices=tuple(x for s in ids for x in spaces.slices[s]),
                counts=tuple(x for s in ids for x in spaces.counts[s]),
                layers=tuple(x for s in ids for x in spaces.layers[s]),
                consumers=tuple(x for s in ids for x in spaces.consumers[s]),
                blocked="; ".join(dict.fromkeys(reasons)) or None,
            )
        )
    return groups, space_to_group


def _resolve(layout: Layout, space_to_group: Mapping[int, int]) -> Layout:
    segments = tuple((space_to_group[s], n) for s, n in layout.segments)
    return Layout(axis=layout.axis, rank=layout.rank, segments=segments, block=layout.block)


def _with_block(group: ChannelGroup, reason: str) -> ChannelGroup:
    from dataclasses import replace

    return replace(group, blocked=reason if group.blocked is None else group.blocked)
