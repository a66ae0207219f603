"""Costs counted on an ONNX file as written: MACs per layer, parameters, bytes on disk.

This module owns the arithmetic of what a model costs to run and to store: multiply-accumulates
of its Conv, ConvTranspose, Gemm and MatMul nodes for one sample, its parameter count and its
size on disk (external data included). It reads a plain ``onnx.ModelProto`` as the file holds
it, without normalising the graph, so a model is counted the same before and after pruning and
the numbers compare with other tools'. Timing belongs to :mod:`sfp_onnx.runtime.bench`; which
channels can be removed, and what that saves, to the analysis.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from sfp_onnx.errors import UnsupportedModelError
from sfp_onnx.graph.load import read_model_proto
from sfp_onnx.graph.passes import fold_static_shapes

__all__ = [
    "UNCOUNTED_OPS",
    "LayerCost",
    "ModelStats",
    "count_layer_costs",
    "count_params",
    "measure_model",
    "model_file_bytes",
    "uncounted_ops",
]

_FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
)
# Initializers up to this many elements keep their values in the copy that shape inference
# reads (Reshape targets, Resize scales); larger ones (weights) only lend it their shape.
_SMALL_TENSOR = 4096
# BatchNormalization inputs 3 and 4 (running mean and variance) are statistics, not
# parameters: PyTorch counts BN as 2 parameters per channel, and so does count_params.
_STATISTIC_INPUTS = {"BatchNormalization": (3, 4)}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayerCost:
    """What one compute node costs.

    Attributes:
        name: the node's name (``<op_type>_<index>`` for an unnamed node).
        op_type: Conv, ConvTranspose, Gemm, MatMul, RNN, GRU or LSTM.
        macs: multiply-accumulates for one sample (batch 1).
        params: elements of the initializers and Constant tensors the node reads directly.
        output_shape: shape of its first output, at the batch size the costs were counted for.
    """

    name: str
    op_type: str
    macs: int
    params: int
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelStats:
    """What a model costs in total: MACs for one sample, parameters, bytes on disk."""

    macs: int
    params: int
    file_bytes: int


def _conv_macs(node: onnx.NodeProto, shape: Callable[[str], Shape]) -> int:
    # weight (C_out, C_in/group, *kernel): each output element reads C_in/group * prod(kernel)
    return math.prod(shape(node.output[0])) * math.prod(shape(node.input[1])[1:])


def _conv_transpose_macs(node: onnx.NodeProto, shape: Callable[[str], Shape]) -> int:
    # weight (C_in, C_out/group, *kernel): each input element is scattered into that many outputs
    return math.prod(shape(node.input[0])) * math.prod(shape(node.input[1])[1:])


def _gemm_macs(node: onnx.NodeProto, shape: Callable[[str], Shape]) -> int:
    a = shape(node.input[0])
    trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
    return math.prod(shape(node.output[0])) * (a[0] if trans_a else a[1])


def _matmul_macs(node: onnx.NodeProto, shape: Callable[[str], Shape]) -> int:
    # numpy semantics: batch and broadcast dims are in the output; K is A's last dim
    return math.prod(shape(node.output[0])) * shape(node.input[0])[-1]


def _recurrent_macs(gates: int) -> Callable[[onnx.NodeProto, Callable[[str], Shape]], int]:
    """RNN (1 gate), GRU (3), LSTM (4): per step and direction, gates·H·(input + H) MACs."""

    def macs(node: onnx.NodeProto, shape: Callable[[str], Shape]) -> int:
        seq, batch, features = shape(node.input[0])  # layout 0: [seq, batch, input]
        directions, rows, _ = shape(node.input[1])  # W: [directions, gates·H, input]
        hidden = rows // gates
        return seq * batch * directions * rows * (features + hidden)

    return macs


# MACs of a whole node at the inferred shapes (all samples of the batch), by op type.
_MACS: dict[str, Callable[[onnx.NodeProto, Callable[[str], Shape]], int]] = {
    "Conv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
    "RNN": _recurrent_macs(1),
    "GRU": _recurrent_macs(3),
    "LSTM": _recurrent_macs(4),
}
# Ops that cost multiply-adds this count does not size; reported so no total hides them.
UNCOUNTED_OPS = frozenset(
    {
        "Einsum", "Attention", "MultiHeadAttention", "ConvInteger", "MatMulInteger",
        "QLinearConv", "QLinearMatMul", "Loop", "Scan", "If", "DeformConv",
    }
)  # fmt: skip


def uncounted_ops(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type in :data:`UNCOUNTED_OPS` the graph has."""
    found: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in UNCOUNTED_OPS:
            found[node.op_type] = found.get(node.op_type, 0) + 1
    return found


def count_layer_costs(model: onnx.ModelProto, batch_size: int = 1) -> list[LayerCost]:
    """Count MACs and parameters of each Conv, ConvTranspose, Gemm, MatMul, RNN, GRU and LSTM
    node, in graph order.

    Shapes come from ONNX shape inference on a light copy of the model (weights replaced by
    their shapes), so ``model`` is left untouched and may be large or hold external data.

    Args:
        model: the model as read from disk; external data loaded or not.
        batch_size: the size given to the symbolic batch axis (axis 0 of the graph inputs).
            It only changes ``output_shape``; ``macs`` are always for one sample.

    Raises:
        UnsupportedModelError: an input axis other than the batch is symbolic, or a node's
            shape cannot be inferred.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    light = _shape_only_copy(model)
    batch = _fix_input_dims(light, batch_size, {t.name for t in model.graph.initializer})
    shapes = _infer_shapes(light)
    if any(
        out not in shapes
        for node in model.graph.node
        if node.op_type in _MACS
        for out in node.output[:1]
    ):
        shapes = _infer_shapes(fold_static_shapes(light))
    sizes = {name: numel for name, (_, numel) in _constant_tensors(model.graph).items()}
    costs = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in _MACS:
            continue
        name = node.name or f"{node.op_type}_{index}"

        def shape(value: str, name: str = name) -> Shape:
            return _lookup(shapes, value, name)

        costs.append(
            LayerCost(
                name=name,
                op_type=node.op_type,
                macs=_MACS[node.op_type](node, shape) // batch,
                params=sum(sizes.get(value, 0) for value in node.input),
                output_shape=shape(node.output[0]),
            )
        )
    return costs


def count_params(model: onnx.ModelProto) -> int:
    """Count the elements of all floating-point initializers and Constant tensors.

    BatchNormalization running statistics (mean, variance) are not parameters and are left
    out, as PyTorch does; integer tensors (shapes, indices) are left out too. A tensor shared
    by several nodes is counted once.
    """
    graph = model.graph
    statistics = {
        node.input[i]
        for node in graph.node
        for i in _STATISTIC_INPUTS.get(node.op_type, ())
        if i < len(node.input)
    }
    return sum(
        numel
        for name, (dtype, numel) in _constant_tensors(graph).items()
        if dtype in _FLOAT_TYPES and name not in statistics
    )


def measure_model(path: str | os.PathLike) -> ModelStats:
    """Read an ONNX file and count its MACs (one sample), parameters and bytes on disk.

    Raises:
        InvalidModelError: the file is missing, not ONNX, or its external data is missing.
        UnsupportedModelError: see :func:`count_layer_costs`.
    """
    model = read_model_proto(path)
    return ModelStats(
        macs=sum(cost.macs for cost in count_layer_costs(model)),
        params=count_params(model),
        file_bytes=model_file_bytes(path),
    )


def model_file_bytes(path: str | os.PathLike) -> int:
    """Size of an ``.onnx`` file plus the external data files it points to (each counted once)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in _all_tensors(model.graph)
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def _all_tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    """Initializers and Constant ``value`` tensors of the main graph."""
    yield from graph.initializer
    for node in graph.node:
        if node.op_type == "Constant":
            yield from (attr.t for attr in node.attribute if attr.name == "value")


# A Constant node's value, as (data type, element count), by the attribute that holds it.
_CONSTANT_VALUES: dict[str, Callable[[onnx.AttributeProto], tuple[int, int]]] = {
    "value": lambda a: (a.t.data_type, math.prod(a.t.dims)),
    "sparse_value": lambda a: (a.sparse_tensor.values.data_type, math.prod(a.sparse_tensor.dims)),
    "value_float": lambda a: (onnx.TensorProto.FLOAT, 1),
    "value_floats": lambda a: (onnx.TensorProto.FLOAT, len(a.floats)),
    "value_int": lambda a: (onnx.TensorProto.INT64, 1),
    "value_ints": lambda a: (onnx.TensorProto.INT64, len(a.ints)),
}


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, tuple[int, int]]:
    """Name -> (data type, element count) of every initializer and Constant output."""
    tensors = {t.name: (t.data_type, math.prod(t.dims)) for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name in _CONSTANT_VALUES:
                tensors[node.output[0]] = _CONSTANT_VALUES[attr.name](attr)
    return tensors


def _shape_only_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model for shape inference: large or unloaded initializers become typed inputs.

    Copying only the structure keeps this cheap for big models and under protobuf's 2 GiB
    limit; shape inference needs the values of small tensors only (Reshape targets...).
    """
    src = model.graph
    graph = onnx.GraphProto(name=src.name)
    graph.node.extend(src.node)
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    graph.sparse_initializer.extend(src.sparse_initializer)
    inputs = {vi.name for vi in src.input}
    for tensor in src.initializer:
        if math.prod(tensor.dims) <= _SMALL_TENSOR and not uses_external_data(tensor):
            graph.initializer.append(tensor)
        elif tensor.name not in inputs:
            info = onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            graph.input.append(info)
    light = onnx.ModelProto(ir_version=model.ir_version, graph=graph)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    return light


def _fix_input_dims(model: onnx.ModelProto, batch_size: int, weights: set[str]) -> int:
    """Give the batch axis of every data input ``batch_size``; return the graph's batch.

    The batch axis is axis 0 of the inputs that are not ``weights``; its symbol is resolved
    wherever else it appears (outputs too).

    Raises:
        UnsupportedModelError: another axis of a data input is symbolic or unknown.
    """
    data = {vi.name for vi in model.graph.input if vi.name not in weights}
    dims = {vi.name: vi.type.tensor_type.shape.dim for vi in model.graph.input if vi.name in data}
    symbols = {d[0].dim_param for d in dims.values() if d and d[0].dim_param}
    for vi in [*model.graph.input, *model.graph.output]:
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                continue
            if dim.dim_param in symbols or (axis == 0 and vi.name in data):
                dim.dim_value = batch_size
            elif vi.name in data:
                raise UnsupportedModelError(
                    f"input {vi.name!r} has a symbolic dimension {dim.dim_param or '?'!r} at "
                    f"axis {axis}; only the batch axis may be symbolic (export a fixed size)"
                )
    first = next((d for d in dims.values() if d), None)
    return first[0].dim_value if first else 1


# Ops whose output has the input's shape, which onnx's inference does not say for every
# opset (GroupNormalization-21, a function, comes out without a shape).
_SHAPE_PRESERVING = frozenset({"GroupNormalization"})


def _infer_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Name -> static shape of every value whose shape inference fully determines."""
    shapes = _run_inference(model)
    hinted = model
    for _ in range(sum(n.op_type in _SHAPE_PRESERVING for n in model.graph.node)):
        hints = [
            onnx.helper.make_tensor_value_info(
                node.output[0], onnx.TensorProto.FLOAT, shapes[node.input[0]]
            )
            for node in hinted.graph.node
            if node.op_type in _SHAPE_PRESERVING and node.input[0] in shapes
            and node.output[0] not in shapes
        ]  # fmt: skip
        if not hints:
            break
        base, hinted = hinted, onnx.ModelProto()
        hinted.CopyFrom(base)
        hinted.graph.value_info.extend(hints)
        shapes = _run_inference(hinted)
    return shapes


def _run_inference(model: onnx.ModelProto) -> dict[str, Shape]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"shape inference fails on this model: {first}") from exc
    graph = inferred.graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    return shapes


def _lookup(shapes: dict[str, Shape], value: str, node: str) -> Shape:
    if value not in shapes:
        raise UnsupportedModelError(
            f"cannot count the MACs of node {node!r}: the shape of {value!r} is unknown"
        )
    return shapes[value]
