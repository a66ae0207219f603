"""Channel rules for the ops that cut or re-lay the channel axis itself.

Split and Slice along the channels (each piece becomes its own space, see
:meth:`AnalysisContext.refine_at`), Flatten and Reshape (channels folded into column blocks
for a Gemm, a GroupNorm's [N, G, -1] view, the way back with ``Shape(v)``), Squeeze,
Unsqueeze, Transpose and Shape. Registered in :data:`AXIS_RULES`, which
:data:`sfp_onnx.graph._channel_rules.RULES` includes; the conventions are that module's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from sfp_onnx.graph.context import AnalysisContext
from sfp_onnx.graph.context import int_list as _ints
from sfp_onnx.graph.context import node_attribute as _attr
from sfp_onnx.graph.groups import Layout

__all__ = ["AXIS_RULES"]


def _cut_axes(node: ir.Node, ctx: AnalysisContext, rank: int) -> list[int] | None:
    """The axes a Split or Slice cuts (None when they are computed at runtime)."""
    if node.op_type == "Split":
        return [_attr(node, "axis", 0) % rank]
    if "axes" in node.attributes:
        return [a % rank for a in _attr(node, "axes")]
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        axes = ctx.const(node.inputs[3])
        return None if axes is None else [a % rank for a in _ints(axes)]
    starts = _attr(node, "starts") if len(node.inputs) < 2 else ctx.const(node.inputs[1])
    return None if starts is None else list(range(len(_ints(starts))))


def _split_or_slice(node: ir.Node, ctx: AnalysisContext) -> None:
    x = ctx.layout(node.inputs[0])
    if x is None:
        return
    axes = _cut_axes(node, ctx, x.rank)
    if axes is None:
        ctx.block(x, f"{node.op_type} {node.name!r} has computed axes")
        return
    if x.axis not in axes:
        for out in node.outputs:
            ctx.set_layout(out, x)
        return
    cut = _channel_split if node.op_type == "Split" else _channel_slice
    problem = None if x.block == 1 else "cuts channels spread over several positions"
    problem = problem or cut(node, ctx, x, axes.index(x.axis))
    if problem:
        ctx.block(ctx.layout(node.inputs[0]), f"{node.op_type} {node.name!r} {problem}")


def _channel_split(node: ir.Node, ctx: AnalysisContext, x: Layout, _: int) -> str | None:
    """A Split along the channels: each output is a range of the input's channels (a Concat
    in reverse); the ``split`` sizes count the channels of their output."""
    sizes_value = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] is not None else None
    sizes = ctx.const(sizes_value) if sizes_value is not None else _attr(node, "split")
    if sizes is None:
        return "splits into equal parts without sizes (normalised away when shapes are known)"
    sizes = _ints(sizes)
    if sum(sizes) != x.channels or len(sizes) != len(node.outputs):
        return "has sizes that do not add up to the channels"
    bounds = np.cumsum([0, *sizes]).tolist()
    layouts = _ranges(node, ctx, bounds)
    if layouts is None:
        return "cuts inside a joined group of other widths"
    for position, (out, layout) in enumerate(zip(node.outputs, layouts, strict=True)):
        if sizes_value is not None:
            ctx.add_count(layout, node, tensor=sizes_value, position=position)
        else:
            ctx.add_count(layout, node, attribute="split", position=position)
        ctx.set_layout(out, layout)
    return None


def _channel_slice(node: ir.Node, ctx: AnalysisContext, x: Layout, index: int) -> str | None:
    """A Slice of the channels [start, end), step 1: ``start`` counts the channels before
    it and ``end`` those before it (unless it runs to the end)."""
    if len(node.inputs) < 3:
        return "is an opset-1 Slice (attributes)"
    starts, ends = (ctx.const(v) for v in node.inputs[1:3])
    steps = ctx.const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
    if starts is None or ends is None:
        return "has computed starts or ends"
    if steps is not None and _ints(steps)[index] != 1:
        return "takes every n-th channel"
    channels = x.channels
    start, end = (_ints(v)[index] for v in (starts, ends))
    start, end = (min(max(v + channels if v < 0 else v, 0), channels) for v in (start, end))
    if start >= end:
        return "takes no channel"
    layouts = _ranges(node, ctx, [0, start, end, channels])
    if layouts is None:
        return "cuts inside a joined group of other widths"
    before, taken, _ = layouts
    if start > 0:
        ctx.add_count(before, node, tensor=node.inputs[1], position=index)
    if end < channels:
        ctx.add_count(replace(before, segments=before.segments + taken.segments), node,
                      tensor=node.inputs[2], position=index)  # fmt: skip
    ctx.set_layout(node.outputs[0], taken)
    return None


def _ranges(node: ir.Node, ctx: AnalysisContext, bounds: list[int]) -> list[Layout] | None:
    """The input's channels [b_i, b_i+1) as layouts, each cut made a segment boundary."""
    for cut in bounds[1:-1]:
        ctx.refine_at(node.inputs[0], cut)
    x = ctx.layout(node.inputs[0])
    edges = [start for _, start, _ in x.offsets()] + [x.channels]
    if any(b not in edges for b in bounds):
        return None
    layouts = []
    for lo, hi in itertools.pairwise(bounds):
        segments = tuple((s, n) for s, start, n in x.offsets() if lo <= start < hi)
        layouts.append(replace(x, segments=segments))
    return layouts


def _dims(value: ir.Value) -> tuple[int | str, ...] | None:
    """A value's dims: ints where known, the symbol's name for symbolic ones."""
    if value.shape is None:
        return None
    dims = tuple(d if isinstance(d, int) else getattr(d, "value", None) for d in value.shape)
    return None if any(d is None for d in dims) else dims


def _flatten_like(node: ir.Node, ctx: AnalysisContext) -> None:
    """Flatten / Reshape that fold channels and what follows them into one axis (→ Gemm)."""
    x = ctx.layout(node.inputs[0])
    if x is None:
        return
    if node.op_type == "Reshape" and _shape_source(node) is not None:
        _reshape_like(node, ctx, x)
        return
    in_shape = _dims(node.inputs[0])
    out_shape = _dims(node.outputs[0])
    reason = f"{node.op_type} {node.name!r} reshapes the channels"
    if (
        in_shape is None
        or out_shape is None
        or not all(isinstance(d, int) for d in in_shape[x.axis :] + out_shape[x.axis :])
    ):
        ctx.block(x, f"{node.op_type} {node.name!r} has unknown shapes")
        return
    if node.op_type == "Flatten" and _attr(node, "axis", 1) % max(len(in_shape), 1) != x.axis:
        ctx.block(x, reason)
        return
    if node.op_type == "Reshape" and _into_norm_groups(node, ctx, x, in_shape, out_shape):
        return
    # Channel c spans `inner` consecutive elements after the channel axis; the output keeps
    # the axes before it and must lay the same elements out as C blocks along the same axis.
    inner = int(np.prod(in_shape[x.axis + 1 :], dtype=np.int64)) * x.block
    tail_size = int(np.prod(out_shape[x.axis + 1 :], dtype=np.int64))
    if (
        len(out_shape) <= x.axis
        or out_shape[: x.axis] != in_shape[: x.axis]
        or inner % tail_size
        or out_shape[x.axis] != x.channels * (inner // tail_size)
    ):
        ctx.block(x, reason)
        return
    new = replace(x, rank=len(out_shape), block=inner // tail_size)
    if node.op_type == "Reshape":
        target = ctx.const(node.inputs[1])
        if target is None:
            ctx.block(x, f"Reshape {node.name!r} has a computed shape")
            return
        if int(target.reshape(-1)[x.axis]) > 0:
            ctx.add_count(x, node, tensor=node.inputs[1], position=x.axis, per_channel=new.block)
    ctx.set_layout(node.outputs[0], new)


def _shape_source(node: ir.Node) -> ir.Value | None:
    """``v`` when a Reshape's target is ``Shape(v)`` (the whole shape, computed at run time)."""
    producer = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] else None
    if producer is None or producer.op_type != "Shape":
        return None
    if _attr(producer, "start", 0) != 0 or _attr(producer, "end") is not None:
        return None
    return producer.inputs[0]


def _reshape_like(node: ir.Node, ctx: AnalysisContext, x: Layout) -> None:
    """``Reshape(y, Shape(v))``: back to ``v``'s shape (a GroupNorm's statistics are taken
    on [N, G, -1]). Exact when ``y`` holds ``v``'s pruning units in order, which then
    shrink together; otherwise both are blocked."""
    source = _shape_source(node)
    target = ctx.layout(source)
    if target is None or target.segments != x.segments or x.block != 1:
        reason = f"Reshape {node.name!r} takes the shape of another tensor"
        ctx.block(x, reason)
        ctx.block(target, reason)
        return
    ctx.set_layout(node.outputs[0], target)


def _into_norm_groups(
    node: ir.Node, ctx: AnalysisContext, x: Layout, in_shape: tuple, out_shape: tuple
) -> bool:
    """``[N, C, ...] -> [N, G, C/G·...]``: a GroupNorm's view of its channels in G groups.

    The channels of each group become one pruning unit (:meth:`AnalysisContext.coarsen`),
    one position of the output's axis; the target's G counts the units.
    """
    axis = x.axis
    groups = out_shape[axis] if len(out_shape) == axis + 2 else None
    if x.block != 1 or not groups or groups >= x.channels or x.channels % groups:
        return False
    factor = x.channels // groups
    spread = int(np.prod(in_shape[axis + 1 :], dtype=np.int64))
    if out_shape[:axis] != in_shape[:axis] or out_shape[axis + 1] != factor * spread:
        return False
    target = ctx.const(node.inputs[1])
    if target is None:
        return False
    units = ctx.coarsen(node.inputs[0], factor, f"{node.name!r} groups channels")
    if units is None:
        return True
    if int(target.reshape(-1)[axis]) > 0:
        ctx.add_count(replace(units, block=1), node, tensor=node.inputs[1], position=axis)
    ctx.set_layout(node.outputs[0], replace(units, rank=len(out_shape), block=1))
    return True


def _squeeze_like(node: ir.Node, ctx: AnalysisContext) -> None:
    x = ctx.layout(node.inputs[0])
    if x is None:
        return
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = ctx.const(node.inputs[1])
    out_rank = ctx.rank(node.outputs[0])
    if axes is None or out_rank is None:
        ctx.block(x, f"{node.op_type} {node.name!r} has unknown axes")
        return
    if node.op_type == "Squeeze":
        axes = [a % x.rank for a in _ints(axes)]
        if x.axis in axes:
            ctx.block(x, f"Squeeze {node.name!r} removes the channel axis")
            return
        new_axis = x.axis - sum(a < x.axis for a in axes)
    else:
        axes = sorted(a % out_rank for a in _ints(axes))
        new_axis = x.axis
        for a in axes:
            if a <= new_axis:
                new_axis += 1
    ctx.set_layout(node.outputs[0], replace(x, axis=new_axis, rank=out_rank))


def _transpose(node: ir.Node, ctx: AnalysisContext) -> None:
    x = ctx.layout(node.inputs[0])
    if x is None:
        return
    perm = _attr(node, "perm") or list(reversed(range(x.rank)))
    ctx.set_layout(node.outputs[0], replace(x, axis=list(perm).index(x.axis)))


def _shape(node: ir.Node, ctx: AnalysisContext) -> None:
    x = ctx.layout(node.inputs[0])
    if x is None:
        return
    start = _attr(node, "start", 0)
    start = start + x.rank if start < 0 else start
    end = _attr(node, "end", x.rank)
    end = end + x.rank if end < 0 else end
    if start <= x.axis < end and not _only_reshape_targets(node.outputs[0]):
        ctx.block(x, f"Shape {node.name!r} reads the channel count")


def _only_reshape_targets(value: ir.Value) -> bool:
    """Every use is a Reshape's target (checked there: see :func:`_reshape_like`)."""
    uses = list(value.uses())
    return bool(uses) and all(user.op_type == "Reshape" and index == 1 for user, index in uses)


AXIS_RULES: dict[str, Callable[[ir.Node, AnalysisContext], None]] = {
    "Split": _split_or_slice,
    "Slice": _split_or_slice,
    "Flatten": _flatten_like,
    "Reshape": _flatten_like,
    "Squeeze": _squeeze_like,
    "Unsqueeze": _squeeze_like,
    "Transpose": _transpose,
    "Shape": _shape,
}
