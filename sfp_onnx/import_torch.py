"""Import: turn the normalised ONNX graph into a trainable torch module, and write weights back.

This module owns the bridge between the ONNX graph the surgery rewrites and the torch module
SFP fine-tunes. :func:`import_model` converts with onnx2torch and links every ONNX initializer
to the torch tensor that holds it (a Conv's weight, a BatchNorm's running mean, a Linear's
weight — transposed when the Gemm had ``transB=0``, an onnx2torch constant buffer), so the
channel groups, stated in ONNX initializer names, address torch tensors directly.
:func:`write_back` copies trained values into the ONNX graph. Unsupported ops are listed
before anything is converted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import torch

from sfp_onnx.errors import UnsupportedModelError

__all__ = ["ImportedModel", "TensorLink", "import_model", "unsupported_ops", "write_back"]

# Inputs of a node that onnx2torch stores as attributes of the node's torch module.
_MODULE_TENSORS: dict[str, dict[int, str]] = {
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "BatchNormalization": {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"},
    "InstanceNormalization": {1: "weight", 2: "bias"},
    "Gemm": {1: "weight", 2: "bias"},
}


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


def unsupported_ops(proto: onnx.ModelProto) -> list[str]:
    """``op-version`` for every node onnx2torch has no converter for (empty when all import)."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in proto.opset_import}
    missing = []
    for node in proto.graph.node:
        version = opsets.get(node.domain or "", opsets.get("", 0))
        try:
            get_converter(node.op_type, version, node.domain or "")
        except NotImplementedError:
            missing.append(f"{node.op_type}-{version}")
    return sorted(set(missing))


def import_model(model: ir.Model) -> ImportedModel:
    """Convert a normalised model with onnx2torch and link its initializers to torch tensors.

    Raises:
        UnsupportedModelError: naming every op (and version) onnx2torch cannot convert.
    """
    import onnx2torch

    proto = ir.serde.serialize_model(model)
    missing = unsupported_ops(proto)
    if missing:
        raise UnsupportedModelError(
            f"cannot import into PyTorch for training: no converter for {', '.join(missing)} "
            "(analyze, slim and prune still work on this model)"
        )
    original_names = [node.name for node in proto.graph.node]
    for index, node in enumerate(proto.graph.node):
        node.name = f"node{index}"  # module names onnx2torch can use verbatim
    try:
        module = onnx2torch.convert(proto)
    except Exception as exc:  # onnx2torch raises many types; all mean "cannot import"
        raise UnsupportedModelError(f"onnx2torch cannot import this model: {exc}") from exc
    links = _module_links(proto, module)
    links.update(_buffer_links(proto, module, set(links)))
    del original_names
    return ImportedModel(module=module, links=links)


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


def _buffer_links(
    proto: onnx.ModelProto, module: torch.nn.Module, linked: set[str]
) -> dict[str, TensorLink]:
    """Constants onnx2torch keeps as buffers, matched by value (each buffer used once)."""
    buffers = [
        (name, buf.detach().cpu().numpy())
        for name, buf in module.named_buffers()
        if name.startswith("initializers.")
    ]
    used: set[str] = set()
    links: dict[str, TensorLink] = {}
    for tensor in proto.graph.initializer:
        if tensor.name in linked or not tensor.dims:
            continue
        value = onnx.numpy_helper.to_array(tensor)
        for name, buf in buffers:
            if name not in used and buf.shape == value.shape and np.array_equal(buf, value):
                used.add(name)
                links[tensor.name] = TensorLink(tensor.name, name)
                break
    return links


def write_back(imported: ImportedModel, model: ir.Model) -> None:
    """Copy the torch module's current values into the model's initializers, in place."""
    for name, array in imported.arrays(list(imported.links)).items():
        value = model.graph.initializers[name]
        old = value.const_value.numpy()
        value.const_value = ir.tensor(array.astype(old.dtype).reshape(old.shape), name=name)
