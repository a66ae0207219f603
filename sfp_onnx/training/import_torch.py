"""Import: turn the normalised ONNX graph into a trainable torch module, and write weights back.

This module owns the bridge between the ONNX graph the surgery rewrites and the torch module SFP
fine-tunes. :func:`import_model` converts a training copy of the graph (prepared by
:mod:`sfp_onnx.graph.passes`: shape arithmetic folded, a fixed batch made dynamic, shapes attached)
with onnx2torch and the extra converters of :mod:`sfp_onnx.training.converters`, then links every
float ONNX initializer to the torch tensor that holds it (a Conv's weight, a BatchNorm's running
mean, a Linear's weight — transposed when the Gemm had ``transB=0`` — or a constant onnx2torch keeps
in its ``initializers`` container), so the channel groups, stated in ONNX initializer names, address
torch tensors directly. Constants read by trainable ops (MatMul weights, a layer scale, a norm's
affine parameters) become parameters. :func:`write_back` copies trained values into the ONNX graph,
which the import never changes. Unsupported ops are listed, with their versions, before training.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import fx, nn

from sfp_onnx.errors import UnsupportedModelError
from sfp_onnx.graph.passes import BATCH_STATISTICS, prepare_training_graph

__all__ = ["ImportedModel", "TensorLink", "import_model", "unsupported_ops", "write_back"]

# onnx2torch 1.5.15's Slice indexes with a list (x[[slice, slice]]), which torch still reads
# as a tuple but warns about on every forward pass; the import is checked against
# onnxruntime, so a change in that reading would be caught, not silently trained.
warnings.filterwarnings(
    "ignore", message="Using a non-tuple sequence for multidimensional indexing",
    category=UserWarning, module="onnx2torch",
)  # fmt: skip

# Inputs of a node that onnx2torch stores as attributes of the node's torch module.
_MODULE_TENSORS: dict[str, dict[int, str]] = {
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "BatchNormalization": {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"},
    "InstanceNormalization": {1: "weight", 2: "bias"},
    "LayerNormalization": {1: "weight", 2: "bias"},
    "Gemm": {1: "weight", 2: "bias"},
}
# Inputs that are weights of the op (trained) when they are float constants of over one
# element; onnx2torch keeps such a constant as a buffer unless the op became a torch layer.
_TRAINABLE_INPUTS: dict[str, tuple[int, ...]] = {
    "Add": (0, 1),
    "BatchNormalization": (1, 2),
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "GroupNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "MatMul": (0, 1),
    "Mul": (0, 1),
    "PRelu": (1,),
}
# Ops that only move a weight's elements: a weight read through them is still a weight.
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
)


@dataclass(frozen=True)
class TensorLink:
    """Where the values of one ONNX initializer live in the torch module.

    ``path`` is the dotted name of the parameter or buffer; ``transposed`` is set when the
    torch tensor is the transpose of the ONNX initializer (a Linear made from Gemm transB=0).
    """

    initializer: str
    path: str
    transposed: bool = False


@dataclass
class ImportedModel:
    """A torch module converted from ONNX, with the links from initializer names to tensors."""

    module: torch.nn.Module
    links: dict[str, TensorLink]

    def tensor(self, initializer: str) -> torch.Tensor:
        """The torch tensor holding ``initializer``, viewed in the ONNX layout (writable)."""
        link = self.links[initializer]
        owner, _, attr = link.path.rpartition(".")
        tensor = getattr(self.module.get_submodule(owner), attr)
        return tensor.t() if link.transposed else tensor

    def arrays(self, names: Iterator[str] | list[str]) -> dict[str, np.ndarray]:
        """Current values of the given initializers, in the ONNX layout."""
        return {n: self.tensor(n).detach().float().cpu().numpy() for n in names if n in self.links}


class BatchStatisticsNorm(nn.BatchNorm2d):
    """A BatchNormalization exported in training mode: it always uses its batch's statistics.

    That is what onnxruntime computes for such a node. The running statistics are kept (and
    linked) only so the written graph keeps them; they take no part in the output.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of rank 2 or more, got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def _op_version(op_type: str, domain: str, opset: int) -> int:
    """The version of ``op_type`` that opset ``opset`` uses (its schema's since_version)."""
    try:
        return onnx.defs.get_schema(op_type, opset, domain).since_version
    except onnx.defs.SchemaError:
        return opset


def unsupported_ops(proto: onnx.ModelProto) -> list[str]:
    """``Op-version`` for every node no converter is registered for (empty when all have one).

    The version is the op's own (``ReduceMean-18`` in an opset-20 graph); the converters of
    :mod:`sfp_onnx.training.converters` count as registered.
    """
    from onnx2torch.node_converters.registry import get_converter

    from sfp_onnx.training.converters import register_converters

    register_converters()
    opsets = {o.domain or "": o.version for o in proto.opset_import}
    missing = []
    for node in proto.graph.node:
        opset = opsets.get(node.domain or "", opsets.get("", 0))
        try:
            get_converter(node.op_type, opset, node.domain or "")
        except NotImplementedError:
            missing.append(f"{node.op_type}-{_op_version(node.op_type, node.domain, opset)}")
    return sorted(set(missing))


def _conversion_failures(proto: onnx.ModelProto) -> list[str]:
    """``Op-version: reason`` for every node whose converter refuses it."""
    from onnx2torch.node_converters.registry import get_converter
    from onnx2torch.onnx_graph import OnnxGraph

    opsets = {o.domain or "": o.version for o in proto.opset_import}
    graph = OnnxGraph(onnx.shape_inference.infer_shapes(proto).graph)
    failures = set()
    for node in graph.nodes.values():
        opset = opsets.get(node.domain or "", opsets.get("", 0))
        try:
            get_converter(node.operation_type, opset, node.domain or "")(node, graph)
        except Exception as exc:  # converters raise many types; each means "cannot convert"
            version = _op_version(node.operation_type, node.domain, opset)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            failures.add(f"{node.operation_type}-{version}: {reason}")
    return sorted(failures)


def _unsupported(proto: onnx.ModelProto, items: list[str]) -> UnsupportedModelError:
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return UnsupportedModelError(
        f"cannot import into PyTorch for training (ONNX opset {opset}): {'; '.join(items)} "
        "(analyze, slim and prune still work on this model)"
    )


def import_model(model: ir.Model) -> ImportedModel:
    """Convert a normalised model with onnx2torch and link its initializers to torch tensors.

    ``model`` itself is not changed: the conversion reads a training copy whose batch axis is
    dynamic (where the export fixed it) and whose shape arithmetic is folded.

    Raises:
        UnsupportedModelError: naming every op (and version) that cannot be converted, or a
            fixed batch that cannot be made dynamic exactly.
    """
    import onnx2torch

    proto = ir.serde.serialize_model(model)
    missing = unsupported_ops(proto)
    if missing:
        raise _unsupported(proto, [f"no converter for {', '.join(missing)}"])
    proto = prepare_training_graph(model)
    for index, node in enumerate(proto.graph.node):
        node.name = f"node{index}"  # module names onnx2torch can use verbatim
    try:
        module = onnx2torch.convert(proto, attach_onnx_mapping=True)
    except Exception as exc:  # onnx2torch raises many types; all mean "cannot import"
        failures = _conversion_failures(proto) or [f"onnx2torch: {exc}"]
        raise _unsupported(proto, failures) from exc
    _keep_batch_statistics(proto, module)
    weights = {t.name for t in model.graph.initializers.values() if _is_weight(t)}
    paths = _container_paths(module)
    _make_trainable(proto, module, paths)
    links = _module_links(proto, module)
    links.update({name: TensorLink(name, path) for name, path in paths.items() if name in weights})
    return ImportedModel(module=module, links={k: v for k, v in links.items() if k in weights})


def _is_weight(value: ir.Value) -> bool:
    """A float initializer of rank 1 or more (scalars are constants of the graph's maths)."""
    tensor = value.const_value
    return tensor is not None and tensor.dtype.is_floating_point() and len(tensor.shape) > 0


def _keep_batch_statistics(proto: onnx.ModelProto, module: nn.Module) -> None:
    """Swap the torch norm of each BatchNormalization marked as training mode."""
    for node in proto.graph.node:
        if not any(p.key == BATCH_STATISTICS for p in node.metadata_props):
            continue
        norm = module.get_submodule(node.name)
        if not isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            reason = "BatchNormalization in training mode with weights computed at run time"
            raise _unsupported(proto, [reason])
        swapped = BatchStatisticsNorm(norm.num_features, eps=norm.eps)
        swapped.load_state_dict(norm.state_dict())
        swapped.onnx_mapping = getattr(norm, "onnx_mapping", None)
        setattr(module, node.name, swapped)


def _container_paths(module: fx.GraphModule) -> dict[str, str]:
    """Initializer name -> dotted path of the constant onnx2torch made of it.

    Read off the fx graph: each converted node's module records its ONNX inputs
    (``onnx_mapping``), passed in order as the call's arguments, constants as ``get_attr``.
    """
    paths: dict[str, str] = {}
    for call in module.graph.nodes:
        if call.op != "call_module":
            continue
        mapping = getattr(module.get_submodule(call.target), "onnx_mapping", None)
        if mapping is None:
            continue
        names = [name for name in mapping.inputs if name]
        for name, arg in zip(names, [*call.args, *call.kwargs.values()], strict=False):
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                paths.setdefault(name, str(arg.target))
    return paths


def _make_trainable(proto: onnx.ModelProto, module: nn.Module, paths: dict[str, str]) -> None:
    """Turn the constant buffers that are weights of trainable ops into parameters."""
    floats = {
        t.name
        for t in proto.graph.initializer
        if t.data_type in _FLOAT_TYPES and np.prod(t.dims) > 1
    }
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in proto.graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    for name in sorted(floats & set(paths)):
        if not _feeds_trainable_input(name, consumers):
            continue
        owner_path, _, attr = paths[name].rpartition(".")
        owner = module.get_submodule(owner_path)
        if attr in dict(owner.named_parameters(recurse=False)):
            continue
        value = getattr(owner, attr)
        delattr(owner, attr)
        owner.register_parameter(attr, nn.Parameter(value.detach().clone()))


def _feeds_trainable_input(name: str, consumers: dict) -> bool:
    """Whether ``name`` is a weight input of a trainable op, directly or through layout ops.

    A Linear the legacy exporter writes without constant folding is ``MatMul(x, Transpose(W))``.
    """
    for node, index in consumers.get(name, ()):
        if index in _TRAINABLE_INPUTS.get(node.op_type, ()):
            return True
        through_layout = node.op_type in _LAYOUT_OPS and index == 0
        if through_layout and _feeds_trainable_input(node.output[0], consumers):
            return True
    return False


def _module_links(proto: onnx.ModelProto, module: torch.nn.Module) -> dict[str, TensorLink]:
    initializers = {t.name: t for t in proto.graph.initializer}
    submodules = dict(module.named_modules())
    links: dict[str, TensorLink] = {}
    for node in proto.graph.node:
        owner = submodules.get(node.name)
        for index, attr in _MODULE_TENSORS.get(node.op_type, {}).items():
            if owner is None or index >= len(node.input) or node.input[index] not in initializers:
                continue
            tensor = getattr(owner, attr, None)
            if not isinstance(tensor, torch.Tensor):
                continue
            onnx_value = onnx.numpy_helper.to_array(initializers[node.input[index]])
            transposed = node.op_type == "Gemm" and index == 1 and tensor.shape != onnx_value.shape
            view = tensor.t() if transposed else tensor
            if tuple(view.shape) == onnx_value.shape and np.array_equal(
                view.detach().cpu().numpy(), onnx_value
            ):
                links[node.input[index]] = TensorLink(
                    node.input[index], f"{node.name}.{attr}", transposed
                )
    return links


def write_back(imported: ImportedModel, model: ir.Model) -> None:
    """Copy the torch module's current values into the model's initializers, in place."""
    for name, array in imported.arrays(list(imported.links)).items():
        value = model.graph.initializers[name]
        old = value.const_value.numpy()
        value.const_value = ir.tensor(array.astype(old.dtype).reshape(old.shape), name=name)
