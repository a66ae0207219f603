"""Converters onnx2torch 1.5.15 lacks: the op versions of opsets 18 to 23.

This module owns the extra entries of onnx2torch's converter registry, so that graphs from
PyTorch's default exporter (dynamo, opset 18 and later) import. Importing the module registers
them once; an entry onnx2torch already has is left alone. Two kinds of entry:

- one small function per op whose semantics changed (an attribute became an input, a new
  attribute or mode): ReduceMean-18 and its sister reductions, Reshape-19/21/23 (with
  ``allowzero=1``), Split-18, AveragePool-19/22, Pad-18/19/21/23, Gelu-20;
- :data:`TYPE_ONLY_VERSIONS`: versions that only widened the set of element types (bfloat16,
  int4, float8...). Their semantics on the float and int64 tensors of a CNN are those of the
  last version onnx2torch converts, so that converter is registered for them unchanged.

Each converter is tested against onnxruntime on a one-node graph (tests/test_converters.py).
What a converter cannot reproduce exactly raises ``NotImplementedError`` with the reason,
which :func:`sfp_onnx.training.import_torch.unsupported_ops` reports. Graph rewrites belong to
:mod:`sfp_onnx.graph.passes`; linking tensors to ONNX names to
:mod:`sfp_onnx.training.import_torch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.registry import add_converter, get_converter
from onnx2torch.onnx_graph import OnnxGraph, ValueType
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import (
    OnnxMapping,
    OnnxToTorchModule,
    OperationConverterResult,
    onnx_mapping_from_node,
)
from torch import nn

__all__ = ["REGISTERED", "TYPE_ONLY_VERSIONS", "register_converters"]

# op -> (the version onnx2torch converts, later versions that only added element types).
TYPE_ONLY_VERSIONS: dict[str, tuple[int, tuple[int, ...]]] = {
    "Cast": (13, (19, 21, 23)),
    "Constant": (13, (19, 21, 23)),
    "ConstantOfShape": (9, (20, 21, 23)),
    "Conv": (11, (22,)),
    "ConvTranspose": (11, (22,)),
    "Dropout": (13, (22,)),
    "Elu": (6, (22,)),
    "Equal": (13, (19,)),
    "Flatten": (13, (21, 23)),
    "GlobalAveragePool": (1, (22,)),
    "HardSigmoid": (6, (22,)),
    "HardSwish": (14, (22,)),
    "Identity": (16, (19, 21, 23)),
    "InstanceNormalization": (6, (22,)),
    "MaxPool": (12, (22,)),
    "Shape": (15, (19, 21, 23)),
    "Softplus": (1, (22,)),
    "Squeeze": (21, (23,)),
    "Transpose": (13, (21, 23)),
    "Unsqueeze": (13, (21, 23)),
}

Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]
# (op, version) pairs this module added to the registry (filled by register_converters).
REGISTERED: list[tuple[str, int]] = []


def _constant(name: str, graph: OnnxGraph) -> torch.Tensor | None:
    """The value of an initializer input, or None when it is computed at run time."""
    if name and graph.value_type(name) == ValueType.GRAPH_INITIALIZER:
        return graph.initializers[name].to_torch()
    return None


def _inputs(node: OnnxNode, keep: int) -> OnnxMapping:
    """The node's mapping with only its first ``keep`` inputs passed at run time."""
    return OnnxMapping(inputs=node.input_values[:keep], outputs=node.output_values)


def _optional(node: OnnxNode, index: int) -> str:
    return node.input_values[index] if index < len(node.input_values) else ""


class _Module(nn.Module, OnnxToTorchModule):
    """Base of this module's torch modules (onnx2torch's marker for converted nodes)."""


# --- Reductions: axes moved from an attribute to an optional input (opset 18) -----------------

_REDUCTIONS: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
    "ReduceMean": lambda x, dims, keep: torch.mean(x, dim=dims, keepdim=keep),
    "ReduceMax": lambda x, dims, keep: torch.amax(x, dim=dims, keepdim=keep),
    "ReduceMin": lambda x, dims, keep: torch.amin(x, dim=dims, keepdim=keep),
    "ReduceSumSquare": lambda x, dims, keep: torch.sum(x * x, dim=dims, keepdim=keep),
    "ReduceL1": lambda x, dims, keep: torch.sum(x.abs(), dim=dims, keepdim=keep),
    "ReduceL2": lambda x, dims, keep: torch.sqrt(torch.sum(x * x, dim=dims, keepdim=keep)),
    "ReduceLogSumExp": lambda x, dims, keep: torch.logsumexp(x, dim=dims, keepdim=keep),
    "ReduceLogSum": lambda x, dims, keep: torch.log(torch.sum(x, dim=dims, keepdim=keep)),
}


class _Reduce(_Module):
    """``Reduce*-18``: reduce over constant ``axes`` (all axes, or none, when empty)."""

    def __init__(self, op: str, axes: Sequence[int], keepdims: bool, noop: bool) -> None:
        super().__init__()
        self.op, self.axes, self.keepdims, self.noop = op, list(axes), keepdims, noop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.axes and self.noop:
            return x
        dims = self.axes or list(range(x.dim()))
        return _REDUCTIONS[self.op](x, dims, self.keepdims)


def convert_reduce(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """ReduceMean-18 (and ReduceMax/Min-18/20, ReduceL1/L2/SumSquare/LogSum/LogSumExp-18)."""
    axes_name = _optional(node, 1)
    axes = _constant(axes_name, graph)
    if axes_name and axes is None:
        raise NotImplementedError(f"{node.operation_type} with axes computed at run time")
    module = _Reduce(
        node.operation_type,
        [] if axes is None else [int(a) for a in axes.reshape(-1).tolist()],
        keepdims=bool(node.attributes.get("keepdims", 1)),
        noop=bool(node.attributes.get("noop_with_empty_axes", 0)),
    )
    return OperationConverterResult(module, _inputs(node, 1))


# --- Reshape-19/21/23: allowzero=1 is read, not refused ----------------------------------------


class _Reshape(_Module):
    """Reshape to a constant target; a 0 entry copies the input's dim unless ``allowzero``."""

    def __init__(self, shape: Sequence[int], allowzero: bool) -> None:
        super().__init__()
        self.shape, self.allowzero = [int(s) for s in shape], allowzero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.reshape(x, _target(x, self.shape, self.allowzero))


class _DynamicReshape(_Module):
    """Reshape to a target computed at run time."""

    def __init__(self, allowzero: bool) -> None:
        super().__init__()
        self.allowzero = allowzero

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(x, _target(x, shape.tolist(), self.allowzero))


def _target(x: torch.Tensor, shape: Sequence[int], allowzero: bool) -> list[int]:
    if allowzero:
        return list(shape)
    return [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]


def convert_reshape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Reshape-19/21/23 (as Reshape-14, element types aside), ``allowzero`` 0 or 1."""
    allowzero = bool(node.attributes.get("allowzero", 0))
    shape = _constant(node.input_values[1], graph)
    if shape is None:
        return OperationConverterResult(_DynamicReshape(allowzero), onnx_mapping_from_node(node))
    return OperationConverterResult(_Reshape(shape.tolist(), allowzero), _inputs(node, 1))


# --- Split-18: num_outputs attribute ----------------------------------------------------------


class _Split(_Module):
    """Split along ``axis`` into given sizes, or ``parts`` chunks of ⌈size/parts⌉."""

    def __init__(self, axis: int, sizes: Sequence[int] | None, parts: int) -> None:
        super().__init__()
        self.axis, self.sizes, self.parts = axis, None if sizes is None else list(sizes), parts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sizes = self.sizes or math.ceil(x.shape[self.axis] / self.parts)
        chunks = torch.split(x, sizes, dim=self.axis)
        if len(chunks) != self.parts:
            raise RuntimeError(f"Split gives {len(chunks)} parts, the graph expects {self.parts}")
        return chunks


def convert_split(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Split-18: sizes from the optional ``split`` input, else ``num_outputs`` equal parts."""
    split_name = _optional(node, 1)
    sizes = _constant(split_name, graph)
    if split_name and sizes is None:
        raise NotImplementedError("Split with sizes computed at run time")
    parts = len(node.output_values)
    module = _Split(
        int(node.attributes.get("axis", 0)), None if sizes is None else sizes.tolist(), parts
    )
    return OperationConverterResult(module, _inputs(node, 1))


# --- AveragePool-19/22: dilations attribute ---------------------------------------------------

_AVG_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def convert_average_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """AveragePool-19/22 without dilation; sized from ``kernel_shape`` (no shapes needed)."""
    del graph
    attrs = node.attributes
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    if any(d != 1 for d in attrs.get("dilations", [1] * rank)):
        raise NotImplementedError("AveragePool with dilations > 1")
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"AveragePool with auto_pad={attrs['auto_pad']}")
    pads = list(attrs.get("pads", [0] * 2 * rank)) if attrs.get("auto_pad") != "VALID" else []
    pads = pads or [0] * 2 * rank
    if pads[:rank] != pads[rank:]:
        raise NotImplementedError("AveragePool with asymmetric pads")
    module = _AVG_POOLS[rank](
        kernel_size=kernel,
        stride=list(attrs.get("strides", [1] * rank)),
        padding=pads[:rank],
        ceil_mode=bool(attrs.get("ceil_mode", 0)),
        count_include_pad=bool(attrs.get("count_include_pad", 0)),
    )
    return OperationConverterResult(module, _inputs(node, 1))


# --- Pad-18/19/21/23: axes input (18), wrap mode (19) ------------------------------------------

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


class _Pad(_Module):
    """Pad (or crop, with negative pads) the listed ``axes`` of the input."""

    def __init__(self, pads: Sequence[int], axes: Sequence[int] | None, mode: str, value: float):
        super().__init__()
        self.pads, self.axes = [int(p) for p in pads], None if axes is None else list(axes)
        self.mode, self.value = mode, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = [a % x.dim() for a in (self.axes or range(x.dim()))]
        count = len(axes)
        begin = dict(zip(axes, self.pads[:count], strict=True))
        end = dict(zip(axes, self.pads[count:], strict=True))
        torch_pads: list[int] = []
        for axis in reversed(range(x.dim())):  # torch lists the last axis first
            torch_pads += [begin.get(axis, 0), end.get(axis, 0)]
        while torch_pads and torch_pads[-2:] == [0, 0]:
            del torch_pads[-2:]
        if self.mode == "constant":
            return F.pad(x, torch_pads, mode="constant", value=self.value)
        return F.pad(x, torch_pads, mode=self.mode)


def convert_pad(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Pad-18/19/21/23 with constant ``pads``, ``constant_value`` and ``axes`` inputs."""
    mode = node.attributes.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"Pad mode {mode!r}")
    names = [_optional(node, i) for i in (1, 2, 3)]
    pads, value, axes = (_constant(name, graph) for name in names)
    runtime = [
        name
        for name, const in zip(names, (pads, value, axes), strict=True)
        if name and const is None
    ]
    if pads is None or runtime:
        raise NotImplementedError("Pad with pads, value or axes computed at run time")
    module = _Pad(
        pads.tolist(),
        None if axes is None else [int(a) for a in axes.tolist()],
        _PAD_MODES[mode],
        0.0 if value is None else float(value.reshape(-1)[0]),
    )
    return OperationConverterResult(module, _inputs(node, 1))


# --- Gelu-20 ----------------------------------------------------------------------------------


def convert_gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Gelu-20: exact (erf) or tanh approximation, as ``torch.nn.GELU``."""
    del graph
    approximate = node.attributes.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise NotImplementedError(f"Gelu approximate={approximate!r}")
    return OperationConverterResult(nn.GELU(approximate=approximate), _inputs(node, 1))


# op -> (converter, versions it is registered for)
_CONVERTERS: dict[str, tuple[Converter, tuple[int, ...]]] = {
    "ReduceMean": (convert_reduce, (18,)),
    "ReduceMax": (convert_reduce, (18, 20)),
    "ReduceMin": (convert_reduce, (18, 20)),
    "ReduceSumSquare": (convert_reduce, (18,)),
    "ReduceL1": (convert_reduce, (18,)),
    "ReduceL2": (convert_reduce, (18,)),
    "ReduceLogSum": (convert_reduce, (18,)),
    "ReduceLogSumExp": (convert_reduce, (18,)),
    "Reshape": (convert_reshape, (19, 21, 23)),
    "Split": (convert_split, (18,)),
    "AveragePool": (convert_average_pool, (19, 22)),
    "Pad": (convert_pad, (18, 19, 21, 23)),
    "Gelu": (convert_gelu, (20,)),
}


def _register(op: str, version: int, converter: Converter) -> None:
    try:
        add_converter(operation_type=op, version=version)(converter)
    except ValueError:  # onnx2torch already converts this version: keep its converter
        return
    REGISTERED.append((op, version))


def register_converters() -> None:
    """Add this module's converters to onnx2torch's registry (once; later calls do nothing)."""
    if REGISTERED:
        return
    for op, (converter, versions) in _CONVERTERS.items():
        for version in versions:
            _register(op, version, converter)
    for op, (base, versions) in TYPE_ONLY_VERSIONS.items():
        for version in versions:
            _register(op, version, get_converter(op, base))


register_converters()
