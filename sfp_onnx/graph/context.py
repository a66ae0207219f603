"""The analysis context: what a channel rule may read and record while the graph is walked.

This module owns the mutable bookkeeping of one walk: channel spaces (merged with a union-find
when elementwise ops join them), and per space the slices, count dependencies, consumers and
block reasons the rules of :mod:`sfp_onnx.graph._channel_rules` record. The driver
(:mod:`sfp_onnx.graph.analyze`) turns the final classes into :class:`ChannelGroup` records.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from sfp_onnx.graph.groups import ChannelSlice, ConsumerPoint, CountDependency, Layout, SliceKind

__all__ = ["AnalysisContext", "SpaceRecords", "int_list", "node_attribute"]


def node_attribute(node: ir.Node, name: str, default=None):
    """The value of ``node``'s attribute ``name``, or ``default`` when it is absent."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def int_list(value) -> list[int]:
    """An integer array (or attribute value) as a flat list of ints."""
    return [int(v) for v in np.asarray(value).reshape(-1)]


class SpaceRecords:
    """Mutable per-space bookkeeping during the walk, merged into groups at the end."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.slices: list[list[ChannelSlice]] = []
        self.counts: list[list[CountDependency]] = []
        self.layers: list[list[str]] = []
        self.consumers: list[list[ConsumerPoint]] = []
        self.blocked: list[list[str]] = []
        self.parts: list[int] = []
        self.retired: set[int] = set()  # spaces split into two by refine_at

    def new(self, size: int) -> int:
        for lst in (self.slices, self.counts, self.layers, self.consumers, self.blocked):
            lst.append([])
        self.parts.append(1)
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
    count dependencies, consumers, joins and blocks. See :mod:`sfp_onnx.graph._channel_rules`.
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.spaces = SpaceRecords()
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
        row_groups: int = 1,
    ) -> None:
        """Record that ``tensor``'s ``axis`` runs over the channels of ``layout``.

        ``row_groups`` > 1: the axis holds one convolution group's input channels (see
        :class:`ChannelSlice`).
        """
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
                    row_groups=row_groups,
                )
            )

    def split_into_parts(self, layout: Layout, part_size: int, reason: str) -> bool:
        """Require ``layout``'s channels to lose the same count in each run of ``part_size``.

        Each segment must hold whole parts; its space then has (a multiple of) that many
        parts. Otherwise the layout is blocked with ``reason`` and False is returned.
        """
        pieces = layout.offsets()
        if layout.block != 1 or any(start % part_size or n % part_size for _, start, n in pieces):
            self.block(layout, f"{reason}: its groups straddle concatenated inputs")
            return False
        for space, _, length in pieces:
            self.spaces.parts[space] = math.lcm(self.spaces.parts[space], length // part_size)
        return True

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

    def refine_at(self, value: ir.Value, cut: int) -> Layout | None:
        """Make channel ``cut`` of ``value`` a segment boundary; returns its new layout.

        A Split or Slice that cuts inside a channel space (the two halves of one conv's
        output, a GLU gate) makes each piece its own space: every space joined with it is cut
        at the same offset into a first and a second part, which inherit its slices (the
        second with offsets shifted by the cut), consumers, count dependencies, layers and
        blocks; the first parts are joined together, and so are the second. Every recorded
        layout that held the old space holds the two parts from now on.
        """
        layout = self.layout(value)
        if layout is None:
            return None
        for space, start, length in layout.offsets():
            if start < cut < start + length:
                self._split_class(space, cut - start)
                return self.layout(value)
        return layout

    def _split_class(self, space: int, offset: int) -> None:
        spaces = self.spaces
        root = spaces.find(space)
        members = [s for s in range(len(spaces.parent)) if spaces.find(s) == root]
        members = [s for s in members if s not in spaces.retired]
        if len({spaces.size[s] for s in members}) > 1:
            return  # joined spaces of other widths: blocked anyway, the cut stays inside
        pieces: dict[int, tuple[int, int]] = {}
        for member in members:
            size = spaces.size[member]
            first, second = spaces.new(offset), spaces.new(size - offset)
            pieces[member] = (first, second)
            self._inherit(member, first, 0, offset)
            self._inherit(member, second, offset, size)
            spaces.retired.add(member)
        firsts, seconds = zip(*pieces.values(), strict=True)
        for a, b in itertools.pairwise(firsts):
            spaces.union(a, b)
        for a, b in itertools.pairwise(seconds):
            spaces.union(a, b)
        for name, layout in self.layouts.items():
            if any(s in pieces for s, _ in layout.segments):
                self.layouts[name] = replace(
                    layout, segments=_split_segments(layout, pieces, offset)
                )

    def _inherit(self, old: int, new: int, start: int, stop: int) -> None:
        """Records of channels [start, stop) of space ``old`` for the new space ``new``."""
        spaces = self.spaces
        spaces.slices[new] = [
            replace(p, offset=p.offset + start * p.block) for p in spaces.slices[old]
        ]
        spaces.counts[new] = list(spaces.counts[old])
        spaces.layers[new] = list(spaces.layers[old])
        spaces.blocked[new] = list(spaces.blocked[old])
        spaces.consumers[new] = [
            replace(c, start=c.start + start, stop=c.start + stop) for c in spaces.consumers[old]
        ]
        parts, size = spaces.parts[old], spaces.size[old]
        part_size = size // parts
        if parts == 1:
            return
        if (stop - start) % part_size or start % part_size:
            spaces.blocked[new].append("a channel split cuts through a convolution group")
        else:
            spaces.parts[new] = (stop - start) // part_size

    def coarsen(self, value: ir.Value, factor: int, reason: str) -> Layout | None:
        """Make runs of ``factor`` consecutive channels of ``value`` one pruning unit.

        A GroupNorm's statistics span each of its groups, so its channels can only go a whole
        group at a time: every space of the layout (and every space joined with one) gets
        ``size / factor`` channels of ``factor`` positions each. Its slices span ``factor``
        times the positions, its consumers and counts are in units; every recorded layout
        that holds one of these spaces is rewritten. Where that is impossible (a run
        straddling two segments, a layout mixing these spaces with others, convolution
        groups the runs cut) the layout is blocked with ``reason`` and None is returned.
        """
        layout = self.layout(value)
        if layout is None or factor == 1:
            return layout
        spaces = self.spaces
        roots = {spaces.find(s) for s, _ in layout.segments}
        members = [s for s in range(len(spaces.parent))
                   if s not in spaces.retired and spaces.find(s) in roots]  # fmt: skip
        touched = {n: lay for n, lay in self.layouts.items()
                   if any(spaces.find(s) in roots for s, _ in lay.segments)}  # fmt: skip
        fits = all(
            spaces.size[s] % factor == 0 and (spaces.size[s] // spaces.parts[s]) % factor == 0
            for s in members
        ) and all(all(spaces.find(s) in roots for s, _ in lay.segments) for lay in touched.values())
        if not fits:
            self.block(layout, reason)
            return None
        for member in members:
            self._coarsen_space(member, factor)
        for name, lay in touched.items():
            segments = tuple((s, n // factor) for s, n in lay.segments)
            self.layouts[name] = replace(lay, segments=segments, block=lay.block * factor)
        return self.layout(value)

    def _coarsen_space(self, space: int, factor: int) -> None:
        spaces = self.spaces
        spaces.size[space] //= factor
        spaces.slices[space] = [replace(p, block=p.block * factor) for p in spaces.slices[space]]
        spaces.consumers[space] = [
            replace(c, start=c.start // factor, stop=c.stop // factor)
            for c in spaces.consumers[space]
        ]
        spaces.counts[space] = [
            replace(c, per_channel=c.per_channel * factor) for c in spaces.counts[space]
        ]

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


def _split_segments(
    layout: Layout, pieces: dict[int, tuple[int, int]], offset: int
) -> tuple[tuple[int, int], ...]:
    """``layout``'s segments with each split space replaced by its two parts."""
    segments = []
    for space, length in layout.segments:
        if space in pieces:
            first, second = pieces[space]
            segments += [(first, offset), (second, length - offset)]
        else:
            segments.append((space, length))
    return tuple(segments)
