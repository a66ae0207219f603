"""The channel-group vocabulary every stage shares: groups, slices, layouts, the analysis.

This module owns the records only: a :class:`ChannelGroup` is a set of channel indices that
must be kept or removed together, with every initializer slice that holds them
(:class:`ChannelSlice`), the numbers that count them (:class:`CountDependency`) and where
channel-mixing nodes read them (:class:`ConsumerPoint`); a :class:`Layout` says how a tensor's
channel axis maps onto groups. Building them is :mod:`sfp_onnx.graph.analyze`; scoring, the
zero analysis, the FLOPs count and the surgery only read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ZEROED_KINDS",
    "Analysis",
    "ChannelGroup",
    "ChannelSlice",
    "ConsumerPoint",
    "CountDependency",
    "Layout",
    "SliceKind",
    "width_label",
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

    ``row_groups`` G > 1 marks the input side of a grouped Conv: ``axis`` holds only the
    P = C_in/G channels one convolution group reads, and channel ``c = offset + i`` of the
    conv's input is position ``c % P`` in the ``c // P``-th of G equal row blocks of axis 0.
    """

    tensor: str
    axis: int
    offset: int
    block: int
    kind: SliceKind
    node: str
    follows: str | None = None
    row_groups: int = 1


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
        parts: the channels form this many equal consecutive parts that must each lose the
            same number of channels (a grouped Conv reads or makes them group by group).
    """

    id: int
    channels: int
    slices: tuple[ChannelSlice, ...]
    counts: tuple[CountDependency, ...]
    layers: tuple[str, ...]
    consumers: tuple[ConsumerPoint, ...]
    blocked: str | None = None
    parts: int = 1

    @property
    def prunable(self) -> bool:
        """True when the group's channels can be removed."""
        return self.blocked is None

    @property
    def filters(self) -> tuple[ChannelSlice, ...]:
        """The producer slices a pruning criterion scores."""
        return tuple(s for s in self.slices if s.kind == "filter")


def width_label(channels: int, parts: int = 1) -> str:
    """A group width as printed: ``"64"``, or ``"64 in 4 groups"`` for a grouped conv's."""
    return f"{channels} in {parts} groups" if parts > 1 else str(channels)


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
