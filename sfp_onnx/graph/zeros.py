"""Exact zeros: which channels of which tensors are identically zero, from the weights alone.

This module owns the exactness reasoning. :func:`find_zero_channels` propagates, in
topological order, a boolean per channel of every tracked tensor: True when the channel is 0
for every input image, proven from the weights (a Conv row and bias of zeros; a norm whose
scale and shift are zero; 0 through ReLU stays 0; x·0 is 0; 0 + 3 is not). A channel may be
removed exactly when it is zero at every consumer that mixes channels
(:func:`removable_channels`); the union-of-kept rule for residual joins falls out of that,
since a channel any branch still uses is nonzero at some consumer. :func:`first_nonzero_consumers`
tells the analysis which groups would not become zero even when all their producer slices
are zeroed, so those are blocked before anyone prunes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from sfp_onnx.graph.groups import ZEROED_KINDS, Analysis, ChannelGroup, Layout

__all__ = ["find_zero_channels", "first_nonzero_consumers", "removable_channels"]

Getter = Callable[[ir.Value], np.ndarray | None]
Vector = np.ndarray  # bool[channels]
ZeroRule = Callable[[ir.Node, list[Vector | None], Getter, Layout], Vector]

# f(0) == 0 for these ops, applied to each channel on its own.
_ZERO_PRESERVING = (
    "Relu", "LeakyRelu", "Tanh", "Elu", "Selu", "Celu", "Gelu", "HardSwish", "Softsign", "Mish",
    "Erf", "Abs", "Neg", "Sqrt", "Sign", "Floor", "Ceil", "Round", "ThresholdedRelu", "PRelu",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
    "Dropout", "Identity", "Cast", "CastLike", "Resize", "Upsample", "Flatten", "Reshape",
    "Squeeze", "Unsqueeze", "Transpose", "Split", "Slice",
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
    "ReduceSumSquare",
)  # fmt: skip


def _rows_zero(weight: np.ndarray, axis: int) -> Vector:
    moved = np.moveaxis(weight, axis, 0)
    return ~moved.reshape(moved.shape[0], -1).any(axis=1)


def _by_channel(zero: np.ndarray, block: int) -> Vector:
    """Positions -> channels: a channel is zero when all ``block`` positions it spans are."""
    return zero if block == 1 else zero.reshape(-1, block).all(axis=1)


def _per_channel(value: np.ndarray | None, layout: Layout, channels: int) -> Vector:
    """Which channels a constant (broadcast against ``layout``) is zero for.

    ``None`` stands for a runtime tensor the analysis does not track: never known to be zero.
    """
    if value is None:
        return np.zeros(channels, dtype=bool)
    from_right = layout.rank - layout.axis
    if value.ndim < from_right:
        return np.full(channels, not value.any())
    axis = value.ndim - from_right
    moved = np.moveaxis(value, axis, 0)
    zero = ~moved.reshape(moved.shape[0], -1).any(axis=1)
    if layout.block > 1 and zero.size == channels * layout.block:
        return _by_channel(zero, layout.block)
    return np.broadcast_to(zero, (channels,)).copy()


def _bias(node: ir.Node, get: Getter, index: int, channels: int, layout: Layout) -> Vector:
    if len(node.inputs) <= index or node.inputs[index] is None:
        return np.ones(channels, dtype=bool)
    bias = get(node.inputs[index])
    if bias is not None and bias.size in (1, channels):
        return np.broadcast_to(bias.reshape(-1) == 0, (channels,)).copy()
    return _per_channel(bias, layout, channels)


def _conv_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    weight = get(node.inputs[1])
    attr = node.attributes.get("group")
    group = 1 if attr is None else attr.value
    if group == 1:  # per output row; find_zero_channels folds rows into pruning units
        return _rows_zero(weight, 0) & _bias(node, get, 2, weight.shape[0], out)
    bias = _bias(node, get, 2, out.channels, out)
    x = ins[0]
    if x is not None and group == len(x) and weight.shape[0] % group == 0:
        # depthwise, with multiplier m = out.block: output positions c*m .. c*m+m-1 read c
        m = weight.shape[0] // group
        positions = _bias(node, get, 2, weight.shape[0], out)
        return _by_channel((np.repeat(x, m) | _rows_zero(weight, 0)) & positions, m)
    return _rows_zero(weight, 0) & bias


def _conv_transpose_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    rows = _rows_zero(get(node.inputs[1]), 1)
    return rows & _bias(node, get, 2, rows.size, out)


def _gemm_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    trans = node.attributes.get("transB")
    rows = _rows_zero(get(node.inputs[1]), 0 if trans is not None and trans.value else 1)
    return rows & _bias(node, get, 2, rows.size, out)


def _matmul_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    return _rows_zero(get(node.inputs[1]), 1)


def _batchnorm_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    scale, shift, mean = (get(v) for v in node.inputs[1:4])
    x = np.repeat(ins[0] if ins[0] is not None else np.zeros(out.channels, bool), out.block)
    return _by_channel(((scale == 0) | (x & (mean == 0))) & (shift == 0), out.block)


def _instancenorm_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    scale, shift = (get(v) for v in node.inputs[1:3])
    x = np.repeat(ins[0] if ins[0] is not None else np.zeros(out.channels, bool), out.block)
    return _by_channel(((scale == 0) | x) & (shift == 0), out.block)


def _groupnorm_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    """A group is zero where its shift is, and its scale or its (whole) input is."""

    def per_group(values: np.ndarray) -> Vector:
        zero = values.reshape(-1) == 0
        return _by_channel(zero, out.block) if zero.size > out.channels else zero

    scale, shift = (get(v) for v in node.inputs[1:3])
    x = ins[0] if ins[0] is not None else np.zeros(out.channels, bool)
    return (per_group(scale) | x) & per_group(shift)


def _keep(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    return ins[0].copy()


def _never(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    return np.zeros(out.channels, dtype=bool)


def _clip_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    bounds = [get(v) if v is not None else None for v in node.inputs[1:3]]
    low = bounds[0] if bounds and bounds[0] is not None else node.attributes.get("min")
    high = bounds[1] if len(bounds) > 1 and bounds[1] is not None else node.attributes.get("max")
    low = getattr(low, "value", low)
    high = getattr(high, "value", high)
    keeps_zero = (low is None or float(np.asarray(low)) <= 0) and (
        high is None or float(np.asarray(high)) >= 0
    )
    return ins[0].copy() if keeps_zero else _never(node, ins, get, out)


def _pad_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    mode = node.attributes.get("mode")
    if mode is not None and mode.value != "constant":
        return ins[0].copy()
    value = get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if value is None and node.attributes.get("value") is not None:
        value = np.asarray(node.attributes["value"].value)
    return (
        ins[0].copy()
        if value is None or not np.asarray(value).any()
        else _never(node, ins, get, out)
    )


def _operands(node: ir.Node, ins: list, get: Getter, out: Layout) -> list[Vector]:
    vectors = []
    for value, vector in zip(node.inputs, ins, strict=True):
        if value is None:
            continue
        if vector is None:
            vector = _per_channel(get(value), out, out.channels)
        vectors.append(np.broadcast_to(vector, (out.channels,)))
    return vectors


def _all_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    return np.logical_and.reduce(_operands(node, ins, get, out))


def _any_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    return np.logical_or.reduce(_operands(node, ins, get, out))


def _div_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    numerator, denominator = _operands(node, ins, get, out)
    return numerator & ~denominator


def _concat_zero(node: ir.Node, ins: list, get: Getter, out: Layout) -> Vector:
    if out.channels == sum(len(v) for v in ins):
        return np.concatenate(ins)
    return np.logical_and.reduce(ins)  # concatenated along another axis


ZERO_RULES: dict[str, ZeroRule] = {
    **dict.fromkeys(_ZERO_PRESERVING, _keep),
    "Conv": _conv_zero,
    "ConvTranspose": _conv_transpose_zero,
    "Gemm": _gemm_zero,
    "MatMul": _matmul_zero,
    "BatchNormalization": _batchnorm_zero,
    "InstanceNormalization": _instancenorm_zero,
    "GroupNormalization": _groupnorm_zero,
    "Clip": _clip_zero,
    "Pad": _pad_zero,
    "Add": _all_zero,
    "Sub": _all_zero,
    "Sum": _all_zero,
    "Mean": _all_zero,
    "Max": _all_zero,
    "Min": _all_zero,
    "Mul": _any_zero,
    "Div": _div_zero,
    "Concat": _concat_zero,
}


def find_zero_channels(
    model: ir.Model, analysis: Analysis, overrides: Mapping[str, np.ndarray] | None = None
) -> dict[str, Vector]:
    """For every tracked tensor, True for each channel that is exactly zero.

    Args:
        model: the normalised model the analysis was built from.
        analysis: its channel analysis.
        overrides: initializer arrays to use instead of the model's (a hypothetical mask).
    """
    overrides = overrides or {}

    def get(value: ir.Value) -> np.ndarray | None:
        if value is None:
            return None
        if value.name in overrides:
            return overrides[value.name]
        return None if value.const_value is None else value.const_value.numpy()

    # Graph inputs are never known to be zero. Seeding them (rather than leaving them out)
    # lets every rule read a vector for each tracked input: a Concat of the raw input with a
    # conv's output (DenseNet-style) used to crash on the missing one.
    zeros: dict[str, Vector] = {
        value.name: np.zeros(analysis.layouts[value.name].channels, dtype=bool)
        for value in model.graph.inputs
        if value.name in analysis.layouts
    }
    for node in model.graph:
        for out in node.outputs:
            layout = analysis.layouts.get(out.name)
            if layout is None:
                continue
            ins = [zeros.get(v.name) if v is not None else None for v in node.inputs]
            if (
                node.op_type in ("Split", "Slice")
                and ins[0] is not None
                and (len(ins[0]) != layout.channels)
            ):
                start = _cut_start(node, out, analysis, get, len(ins[0]))
                zeros[out.name] = ins[0][start : start + layout.channels].copy()
                continue
            rule = ZERO_RULES.get(node.op_type, _never)
            if rule is _keep and ins[0] is None:
                rule = _never
            vector = np.asarray(rule(node, ins, get, layout), dtype=bool)
            if layout.block > 1 and vector.size == layout.channels * layout.block:
                vector = _by_channel(vector, layout.block)  # a producer's rows, in units
            zeros[out.name] = vector
    return zeros


def _cut_start(node: ir.Node, out: ir.Value, analysis: Analysis, get: Getter, total: int) -> int:
    """The first input channel of ``out``, a piece of a channel Split or Slice."""
    if node.op_type == "Split":
        earlier = node.outputs[: list(node.outputs).index(out)]
        return sum(analysis.layouts[v.name].channels for v in earlier)
    layout = analysis.layouts[node.inputs[0].name]
    axes = get(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    index = layout.axis  # without axes, the i-th start is for axis i
    if axes is not None:
        index = [int(a) % layout.rank for a in np.asarray(axes).reshape(-1)].index(layout.axis)
    start = int(np.asarray(get(node.inputs[1])).reshape(-1)[index])
    return min(max(start + total if start < 0 else start, 0), total)


def _zero_at_consumers(group: ChannelGroup, zeros: Mapping[str, Vector]) -> Vector:
    keep = np.zeros(group.channels, dtype=bool)
    for point in group.consumers:
        vector = zeros.get(point.value)
        if vector is None:
            return np.zeros(group.channels, dtype=bool)
        keep |= ~vector[point.start : point.stop]
    return ~keep


def removable_channels(model: ir.Model, analysis: Analysis) -> dict[int, np.ndarray]:
    """Channel indices of each prunable group that are zero wherever they are read.

    A channel any branch of a residual join still uses is nonzero at that branch's consumer,
    so it is kept: the kept set is the union over branches. At least one channel of each
    group stays, so no layer ends up with zero width.
    """
    zeros = find_zero_channels(model, analysis)
    removable: dict[int, np.ndarray] = {}
    for group in analysis.prunable_groups:
        removable[group.id] = _equal_in_parts(_zero_at_consumers(group, zeros), group.parts)
    return removable


def _equal_in_parts(zero: Vector, parts: int) -> np.ndarray:
    """Indices to remove: the same count of zero channels from each of ``parts`` equal runs.

    A grouped convolution keeps one width per group, so each part gives up only as many of
    its zero channels as the part with the fewest (its last ones; all are exactly zero),
    and every part keeps at least one channel (the first, when all are zero).
    """
    runs = zero.reshape(parts, -1)
    count = min(int(runs.sum(axis=1).min()), runs.shape[1] - 1)
    size = runs.shape[1]
    return np.concatenate(
        [p * size + np.flatnonzero(run)[run.sum() - count :] for p, run in enumerate(runs)]
    ).astype(np.int64)


def masked_arrays(
    model: ir.Model,
    groups: list[ChannelGroup] | tuple[ChannelGroup, ...],
    indices: Mapping[int, np.ndarray],
) -> dict[str, np.ndarray]:
    """Copies of the initializers with the given channels of each group zeroed.

    Zeroes the filter rows, biases and BatchNorm running means (:data:`ZEROED_KINDS`) of each
    channel, which makes it exactly zero at every consumer of a prunable group while the norm
    scale stays, so a zeroed filter still receives gradients.
    """
    initializers = model.graph.initializers
    arrays: dict[str, np.ndarray] = {}
    for group in groups:
        chosen = np.asarray(indices.get(group.id, ()), dtype=np.int64)
        if chosen.size == 0:
            continue
        for piece in group.slices:
            if piece.kind not in ZEROED_KINDS:
                continue
            if piece.tensor not in arrays:
                arrays[piece.tensor] = initializers[piece.tensor].const_value.numpy().copy()
            array = arrays[piece.tensor]
            positions = piece.offset + (chosen[:, None] * piece.block + np.arange(piece.block))
            index = [slice(None)] * array.ndim
            index[piece.axis] = positions.reshape(-1)
            array[tuple(index)] = 0
    return arrays


def first_nonzero_consumers(model: ir.Model, analysis: Analysis) -> dict[int, str]:
    """Groups that stay nonzero somewhere even with all their channels masked, and where."""
    candidates = analysis.prunable_groups
    everything = {g.id: np.arange(g.channels) for g in candidates}
    zeros = find_zero_channels(model, analysis, masked_arrays(model, candidates, everything))
    leaks: dict[int, str] = {}
    for group in candidates:
        for point in group.consumers:
            vector = zeros.get(point.value)
            if vector is None or not vector[point.start : point.stop].all():
                leaks[group.id] = f"nonzero at the input of {point.node!r}"
                break
    return leaks
