"""Channel analysis: which channels of which tensors must be kept or removed together.

This module owns the driver that builds the channel groups (:mod:`sfp_onnx.graph.groups`)
from a normalised :class:`onnx_ir.Model`. It walks the graph once in topological order; every
op type maps to one handler in :mod:`sfp_onnx.graph._channel_rules` that says how the op moves
channels (creates a space, passes it on, joins spaces, reads it, or blocks it), recording into
an :class:`~sfp_onnx.graph.context.AnalysisContext`. Spaces joined by elementwise ops are
merged with a union-find; each final class is one group. A group is prunable when nothing
blocks it and, with its producer slices zeroed, every consumer sees exact zeros (checked with
:mod:`sfp_onnx.graph.zeros`). Soft pruning, the FLOPs count and the surgery only read the
groups, so they cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import onnx_ir as ir

from sfp_onnx.graph._channel_rules import RULES, block_unknown
from sfp_onnx.graph.context import AnalysisContext
from sfp_onnx.graph.groups import Analysis, ChannelGroup, Layout
from sfp_onnx.graph.zeros import first_nonzero_consumers

__all__ = ["analyze_model"]


def analyze_model(model: ir.Model) -> Analysis:
    """Build the channel groups of a normalised model (see :func:`sfp_onnx.graph.load.load_model`).

    Graph inputs and outputs block their groups (the interface keeps its shape); every op
    without a rule blocks the channels it reads.
    """
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
        if space not in spaces.retired:
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
                parts=math.lcm(*(spaces.parts[s] for s in ids)),
            )
        )
    return groups, space_to_group


def _resolve(layout: Layout, space_to_group: Mapping[int, int]) -> Layout:
    segments = tuple((space_to_group[s], n) for s, n in layout.segments)
    return Layout(axis=layout.axis, rank=layout.rank, segments=segments, block=layout.block)


def _with_block(group: ChannelGroup, reason: str) -> ChannelGroup:
    return replace(group, blocked=reason if group.blocked is None else group.blocked)
