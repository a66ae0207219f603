"""Channel rules: how each ONNX op creates, passes, joins, reads or blocks channels.

One small function per op family, registered in :data:`RULES` by op type; the analysis driver
(:mod:`sfp_onnx.graph.analyze`) calls the rule of every node in topological order. A rule reads the
layouts of the node's inputs from the context and records slices, joins and blocks; ops
without a rule block the channels they read (:func:`block_unknown`). Whether zero stays zero
through an op is not decided here but in :mod:`sfp_onnx.graph.zeros`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from sfp_onnx.graph._axis_rules import AXIS_RULES
from sfp_onnx.graph.context import AnalysisContext
from sfp_onnx.graph.context import int_list as _ints
from sfp_onnx.graph.context import node_attribute as _attr
from sfp_onnx.graph.groups import Layout

__all__ = ["PASSTHROUGH_OPS", "RULES", "block_unknown"]

Rule = Callable[[ir.Node, AnalysisContext], None]


def block_unknown(node: ir.Node, ctx: AnalysisContext) -> None:
    """Ops sfp-onnx does not understand block every channel they read."""
    ctx.block_inputs(node, f"read by {node.op_type} node {node.name!r}, not pruned through")


def _weight(node: ir.Node, ctx: AnalysisContext, index: int) -> ir.Value | None:
    """The initializer at input ``index``, or None (and a block) if it is computed."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is not None and value.const_value is None:
        ctx.block_inputs(node, f"{node.op_type} node {node.name!r} has computed weights")
        return None
    return value


def _producer(node: ir.Node, ctx: AnalysisContext, size: int, rank: int) -> Layout:
    space = ctx.new_space(size, node.name)
    return Layout(axis=1 if rank > 1 else 0, rank=rank, segments=((space, size),))


def _conv(node: ir.Node, ctx: AnalysisContext) -> None:
    x = ctx.layout(node.inputs[0])
    weight = _weight(node, ctx, 1)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if weight is None:
        return
    w_shape = weight.const_value.shape
    group = _attr(node, "group", 1)
    rank = len(w_shape)
    out = node.outputs[0]
    if group == 1:
        if x is not None:
            ctx.add_slices(x, weight, 1, "input", node)
            ctx.add_consumer(x, node, node.inputs[0])
        layout = _producer(node, ctx, w_shape[0], rank)
        ctx.add_slices(layout, weight, 0, "filter", node)
        if bias is not None:
            ctx.add_slices(layout, bias, 0, "bias", node)
        ctx.set_layout(out, layout)
        return
    depthwise = x is not None and group == x.channels and w_shape[1] == 1 and x.block == 1
    if depthwise and w_shape[0] % group == 0:
        # Depthwise with multiplier m = C_out / C_in (1: plain depthwise): output channels
        # c*m .. c*m+m-1 are computed from input channel c alone, so they are channel c's
        # block of m positions; the channel count is the group count.
        layout = replace(x, block=w_shape[0] // group)
        ctx.add_slices(layout, weight, 0, "param", node)
        if bias is not None:
            ctx.add_slices(layout, bias, 0, "bias", node)
        ctx.add_count(x, node, attribute="group")
        ctx.set_layout(out, layout)
        return
    _grouped_conv(node, ctx, x, weight, bias, group)


def _grouped_conv(
    node: ir.Node,
    ctx: AnalysisContext,
    x: Layout | None,
    weight: ir.Value,
    bias: ir.Value | None,
    group: int,
) -> None:
    """A Conv of G groups: output group g reads only input group g.

    Both channel axes are cut into G equal parts that must each lose the same number of
    channels, so ``group`` stays G and the weight stays [C_out, C_in/G, k...]; the input
    side deletes, in each block of rows, the columns of that block's input channels.
    """
    w_shape = weight.const_value.shape
    reason = f"grouped convolution {node.name!r} (group={group})"
    if x is not None and ctx.split_into_parts(x, w_shape[1], reason):
        ctx.add_slices(x, weight, 1, "input", node, row_groups=group)
        ctx.add_consumer(x, node, node.inputs[0])
    layout = _producer(node, ctx, w_shape[0], len(w_shape))
    if w_shape[0] % group or not ctx.split_into_parts(layout, w_shape[0] // group, reason):
        ctx.block(layout, reason)
    ctx.add_slices(layout, weight, 0, "filter", node)
    if bias is not None:
        ctx.add_slices(layout, bias, 0, "bias", node)
    ctx.set_layout(node.outputs[0], layout)


def _conv_transpose(node: ir.Node, ctx: AnalysisContext) -> None:
    x = ctx.layout(node.inputs[0])
    weight = _weight(node, ctx, 1)
    if weight is None:
        return
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    w_shape = weight.const_value.shape
    layout = _producer(node, ctx, w_shape[1] * _attr(node, "group", 1), len(w_shape))
    if _attr(node, "group", 1) != 1 or _attr(node, "output_shape") is not None:
        reason = f"ConvTranspose {node.name!r} is grouped or has a fixed output_shape"
        ctx.block(x, reason)
        ctx.block(layout, reason)
    else:
        if x is not None:
            ctx.add_slices(x, weight, 0, "input", node)
            ctx.add_consumer(x, node, node.inputs[0])
        ctx.add_slices(layout, weight, 1, "filter", node)
        if bias is not None:
            ctx.add_slices(layout, bias, 0, "bias", node)
    ctx.set_layout(node.outputs[0], layout)


def _gemm(node: ir.Node, ctx: AnalysisContext) -> None:
    x = ctx.layout(node.inputs[0])
    weight = _weight(node, ctx, 1)
    if weight is None:
        return
    trans_b = _attr(node, "transB", 0)
    out_features = weight.const_value.shape[0 if trans_b else 1]
    layout = _producer(node, ctx, out_features, 2)
    if _attr(node, "transA", 0):
        ctx.block(x, f"Gemm {node.name!r} transposes its input")
    elif x is not None and x.axis == 1:
        ctx.add_slices(x, weight, 1 if trans_b else 0, "input", node)
        ctx.add_consumer(x, node, node.inputs[0])
    ctx.add_slices(layout, weight, 0 if trans_b else 1, "filter", node)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and bias.const_value is not None and bias.const_value.size == out_features:
        ctx.add_slices(layout, bias, len(bias.const_value.shape) - 1, "bias", node)
    elif bias is not None and (bias.const_value is None or bias.const_value.size != 1):
        ctx.block(layout, f"Gemm {node.name!r} has a bias that is not per-feature")
    ctx.set_layout(node.outputs[0], layout)


def _matmul(node: ir.Node, ctx: AnalysisContext) -> None:
    x = ctx.layout(node.inputs[0])
    weight = node.inputs[1]
    if weight.const_value is None or len(weight.const_value.shape) != 2:
        ctx.block_inputs(node, f"MatMul {node.name!r} of two activations")
        return
    rank = ctx.rank(node.outputs[0]) or (x.rank if x is not None else 2)
    if x is not None and x.axis == x.rank - 1:
        ctx.add_slices(x, weight, 0, "input", node)
        ctx.add_consumer(x, node, node.inputs[0])
    else:
        ctx.block(x, f"MatMul {node.name!r} does not contract the channel axis")
    space = ctx.new_space(weight.const_value.shape[1], node.name)
    layout = Layout(axis=rank - 1, rank=rank, segments=((space, weight.const_value.shape[1]),))
    ctx.add_slices(layout, weight, 1, "filter", node)
    ctx.set_layout(node.outputs[0], layout)


_LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _norm_params(kinds: tuple[str, ...]) -> Rule:
    """BatchNormalization / InstanceNormalization: per-channel parameters on axis 1."""

    def rule(node: ir.Node, ctx: AnalysisContext) -> None:
        x = ctx.layout(node.inputs[0])
        if x is None:
            return
        if x.axis != 1:
            ctx.block(x, f"{node.op_type} {node.name!r} normalises another axis")
            return
        producer = node.inputs[0].producer()
        follows = producer.name if producer is not None and producer.op_type in _LAYERS else None
        for value, kind in zip(node.inputs[1:], kinds, strict=False):
            if value is None or value.const_value is None:
                ctx.block(x, f"{node.op_type} {node.name!r} has computed parameters")
                return
            ctx.add_slices(x, value, 0, kind, node, follows=follows)
        if any(out is not None and out.uses() for out in node.outputs[1:]):
            ctx.block(x, f"{node.op_type} {node.name!r} uses its training-mode outputs")
        ctx.set_layout(node.outputs[0], x)

    return rule


def _group_norm(node: ir.Node, ctx: AnalysisContext) -> None:
    """GroupNormalization: statistics per group of C/G channels, so a group goes whole.

    Scale and bias are per channel (opset 21) or per group (opset 18); ``num_groups``
    counts the groups left.
    """
    x = ctx.layout(node.inputs[0])
    if x is None:
        return
    groups = _attr(node, "num_groups")
    reason = f"GroupNormalization {node.name!r}"
    if x.axis != 1 or x.block != 1 or not groups or x.channels % groups:
        ctx.block(x, f"{reason} groups channels it cannot track")
        return
    units = ctx.coarsen(node.inputs[0], x.channels // groups, f"{reason} groups channels")
    if units is None:
        return
    for value, kind in zip(node.inputs[1:3], ("scale", "bias"), strict=True):
        size = value.const_value.size if value is not None and value.const_value else None
        if size not in (groups, x.channels):
            ctx.block(units, f"{reason} has computed or odd-sized parameters")
            return
        ctx.add_slices(units if size == x.channels else replace(units, block=1), value, 0,
                       kind, node)  # fmt: skip
    ctx.add_count(units, node, attribute="num_groups")
    ctx.set_layout(node.outputs[0], units)


def _passthrough(node: ir.Node, ctx: AnalysisContext) -> None:
    """Channel-wise ops: the output carries the input's channels unchanged."""
    x = ctx.layout(node.inputs[0])
    ctx.set_layout(node.outputs[0], x)


def _spatial_only(check: Callable[[ir.Node, AnalysisContext, Layout], str | None]) -> Rule:
    """A passthrough op whose parameters must leave the channel axis alone."""

    def rule(node: ir.Node, ctx: AnalysisContext) -> None:
        x = ctx.layout(node.inputs[0])
        if x is None:
            return
        problem = check(node, ctx, x)
        if problem:
            ctx.block(x, f"{node.op_type} {node.name!r} {problem}")
            return
        ctx.set_layout(node.outputs[0], x)

    return rule


def _pad_check(node: ir.Node, ctx: AnalysisContext, x: Layout) -> str | None:
    pads = _attr(node, "pads") if len(node.inputs) < 2 else ctx.const(node.inputs[1])
    if pads is None:
        return "has computed pads"
    pads = _ints(pads)
    axes_value = ctx.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
    axes = _ints(axes_value) if axes_value is not None else list(range(len(pads) // 2))
    axes = [a % x.rank for a in axes]
    half = len(pads) // 2
    if x.axis in axes:
        i = axes.index(x.axis)
        if pads[i] or pads[i + half]:
            return "pads the channel axis"
    return None


def _resize_check(node: ir.Node, ctx: AnalysisContext, x: Layout) -> str | None:
    scales_index = 1 if node.op_type == "Upsample" else 2
    scales = ctx.const(node.inputs[scales_index]) if len(node.inputs) > scales_index else None
    if scales is None and node.op_type == "Upsample":
        scales = _attr(node, "scales")
    sizes = ctx.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
    if scales is not None and np.asarray(scales).size:
        return None if float(np.asarray(scales).reshape(-1)[x.axis]) == 1.0 else "scales channels"
    if sizes is not None and np.asarray(sizes).size == x.rank:
        ctx.add_count(x, node, tensor=node.inputs[3], position=x.axis)
        return None
    return "has computed scales" if sizes is None else "resizes a subset of axes"


def _reduce(node: ir.Node, ctx: AnalysisContext) -> None:
    x = ctx.layout(node.inputs[0])
    if x is None:
        return
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = ctx.const(node.inputs[1])
        if axes is None:
            ctx.block(x, f"{node.op_type} {node.name!r} has computed axes")
            return
    if axes is None or np.asarray(axes).size == 0:
        if _attr(node, "noop_with_empty_axes", 0):
            ctx.set_layout(node.outputs[0], x)
        else:
            ctx.block(x, f"{node.op_type} {node.name!r} reduces over the channels")
        return
    axes = sorted(a % x.rank for a in _ints(axes))
    if x.axis in axes:
        ctx.block(x, f"{node.op_type} {node.name!r} reduces over the channels")
        return
    if _attr(node, "keepdims", 1):
        ctx.set_layout(node.outputs[0], x)
    else:
        shift = sum(a < x.axis for a in axes)
        ctx.set_layout(node.outputs[0], replace(x, axis=x.axis - shift, rank=x.rank - len(axes)))


def _elementwise(node: ir.Node, ctx: AnalysisContext) -> None:
    """Add, Mul, Max, ... : activations are joined, per-channel constants are sliced."""
    operands = [v for v in node.inputs if v is not None]
    tracked = [(v, ctx.layout(v)) for v in operands if ctx.layout(v) is not None]
    if not tracked:
        return
    untracked = [v for v in operands if ctx.layout(v) is None and v.const_value is None]
    reason = f"{node.op_type} {node.name!r}"
    if untracked:
        ctx.block_inputs(node, f"{reason} mixes channels with an untracked tensor")
        return
    out_rank = max(ctx.rank(v) or lay.rank for v, lay in tracked)
    main = max((lay for _, lay in tracked), key=lambda lay: lay.channels)
    main_from_right = main.rank - main.axis
    for _, lay in tracked:
        if lay is main:
            continue
        if lay.rank - lay.axis != main_from_right or lay.block != main.block:
            ctx.block_inputs(node, f"{reason} joins tensors whose channel axes differ")
            return
        if lay.channels == 1 and main.channels > 1:
            ctx.block(lay, f"{reason} broadcasts it over channels")
        elif not ctx.join(main, lay):
            ctx.block_inputs(node, f"{reason} joins differently concatenated channels")
            return
    kind = "bias" if node.op_type in ("Add", "Sub", "Sum", "Mean") else "param"
    for value in operands:
        if ctx.layout(value) is None and not _slice_constant(ctx, node, value, main, kind):
            ctx.block_inputs(node, f"{reason} has a constant that does not broadcast per channel")
            return
    ctx.set_layout(node.outputs[0], replace(main, rank=out_rank, axis=out_rank - main_from_right))


def _slice_constant(
    ctx: AnalysisContext, node: ir.Node, value: ir.Value, main: Layout, kind: str
) -> bool:
    shape = value.const_value.shape
    from_right = main.rank - main.axis
    if len(shape) < from_right:
        return True  # broadcasts over the channel axis
    axis = len(shape) - from_right
    if shape[axis] == 1:
        return True
    if shape[axis] != main.channels * main.block:
        return False
    ctx.add_slices(replace(main, axis=axis), value, axis, kind, node)
    return True


def _concat(node: ir.Node, ctx: AnalysisContext) -> None:
    layouts = [ctx.layout(v) for v in node.inputs]
    if not any(layouts):
        return
    if not all(layouts):
        ctx.block_inputs(node, f"Concat {node.name!r} mixes tracked and constant tensors")
        return
    first = layouts[0]
    axis = _attr(node, "axis") % first.rank
    if all(
        lay.axis == axis and lay.rank == first.rank and lay.block == first.block for lay in layouts
    ):
        segments = tuple(seg for lay in layouts for seg in lay.segments)
        ctx.set_layout(node.outputs[0], replace(first, segments=segments))
        return
    if axis != first.axis and all(ctx.join(first, lay) for lay in layouts[1:]):
        ctx.set_layout(node.outputs[0], first)
        return
    ctx.block_inputs(node, f"Concat {node.name!r} along an axis sfp-onnx cannot track")


def _prelu(node: ir.Node, ctx: AnalysisContext) -> None:
    x = ctx.layout(node.inputs[0])
    if x is None:
        return
    slope = node.inputs[1]
    if slope.const_value is None or not _slice_constant(ctx, node, slope, x, "param"):
        ctx.block(x, f"PRelu {node.name!r} has a slope that is not per channel")
        return
    ctx.set_layout(node.outputs[0], x)


#: Ops that map each channel to itself and have no parameters to slice.
PASSTHROUGH_OPS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Gelu", "Softplus", "Softsign", "Mish", "Erf", "Abs", "Neg", "Exp", "Sqrt", "Reciprocal",
    "Clip", "ThresholdedRelu", "Shrink", "Floor", "Ceil", "Round", "Sign", "Not",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
    "Dropout", "Identity", "Cast", "CastLike",
)  # fmt: skip

RULES: dict[str, Rule] = {
    **dict.fromkeys(PASSTHROUGH_OPS, _passthrough),
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "BatchNormalization": _norm_params(("scale", "bias", "mean", "param")),
    "InstanceNormalization": _norm_params(("scale", "bias")),
    "GroupNormalization": _group_norm,
    "PRelu": _prelu,
    "Pad": _spatial_only(_pad_check),
    "Resize": _spatial_only(_resize_check),
    "Upsample": _spatial_only(_resize_check),
    **dict.fromkeys(
        (
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceSum",
            "ReduceL1",
            "ReduceL2",
            "ReduceSumSquare",
            "ReduceLogSumExp",
            "ReduceProd",
        ),
        _reduce,
    ),
    **dict.fromkeys(("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"), _elementwise),
    "Concat": _concat,
    **AXIS_RULES,
}
