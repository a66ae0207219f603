"""Loading: read an ONNX file, refuse what sfp-onnx cannot handle, normalise the graph.

This module owns everything between a path on disk and the :class:`onnx_ir.Model` that the
analysis reads and the surgery rewrites, and the way back to disk (:func:`save_model`). It
checks the input (exists, parses, passes the ONNX checker, a float graph with a Conv in an
opset we read) and normalises it with semantics-preserving passes so the analysis sees every
weight as a private initializer of the node that reads it. It leaves channel reasoning to
:mod:`sfp_onnx.graph.analyze`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from google.protobuf.message import DecodeError

from sfp_onnx._io import OutputError
from sfp_onnx.errors import InvalidModelError, UnsupportedModelError
from sfp_onnx.graph.passes import fold_static_shape_reads

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "MIN_OPSET",
    "QUANTIZED_OPS",
    "UnshareInitializersPass",
    "check_model_proto",
    "clone_model",
    "load_model",
    "normalize_model",
    "read_model_proto",
    "save_model",
]

MIN_OPSET = 7
MAX_OPSET = onnx.defs.onnx_opset_version()
# Over this size (protobuf's hard limit is 2 GiB) models are written with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
QUANTIZED_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "ConvInteger",
        "MatMulInteger",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearGlobalAveragePool",
    }
)


def read_model_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file with its external data, turning every failure into one clear line.

    Raises:
        InvalidModelError: missing, empty, not ONNX, truncated, external data missing.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModelError(f"{path} is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{path} is empty, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise InvalidModelError(f"{path} is not an ONNX model (it does not parse: {exc})") from exc
    if not model.graph.node or model.ir_version == 0:
        raise InvalidModelError(f"{path} is not an ONNX model (no graph in it)")
    _load_external_data(model, path)
    return model


def _external_locations(model: onnx.ModelProto) -> set[str]:
    from onnx.external_data_helper import uses_external_data

    return {
        entry.value
        for tensor in onnx.external_data_helper._get_all_tensors(model)
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _check_location(path: Path, location: str) -> None:
    """Refuse external data that is not a plain file inside the model's own folder.

    A model file must not make sfp-onnx read anything else: an absolute path, a ``..`` that
    climbs out of the folder, or a symbolic link (which may point anywhere).
    """
    folder = path.parent.resolve()
    target = path.parent / location
    inside = not Path(location).is_absolute() and ".." not in Path(location).parts
    if not inside or target.is_symlink() or not target.resolve().is_relative_to(folder):
        raise InvalidModelError(
            f"{path} keeps weights in {location!r}, outside its own folder or through a "
            "symbolic link; external data must be a file beside the model"
        )


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model

    locations = _external_locations(model)
    for location in sorted(locations):
        _check_location(path, location)
    missing = sorted(loc for loc in locations if not (path.parent / loc).exists())
    if missing:
        raise InvalidModelError(
            f"{path} keeps its weights in {', '.join(missing)}, which is missing beside it"
        )
    try:
        load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{path}: cannot read its external data: {exc}") from exc


def check_model_proto(model: onnx.ModelProto, name: str) -> None:
    """Refuse models sfp-onnx cannot prune, each with a one-line reason.

    Raises:
        InvalidModelError: the ONNX checker rejects it.
        UnsupportedModelError: unsupported opset, quantized graph, or no Conv.
    """
    opset = _default_opset(model)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"{name} uses opset {opset}; sfp-onnx reads opsets {MIN_OPSET} to {MAX_OPSET}"
        )
    try:
        if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"{name} fails the ONNX checker: {first}") from exc
    op_types = {node.op_type for node in model.graph.node}
    quantized = sorted(op_types & QUANTIZED_OPS)
    if quantized:
        raise UnsupportedModelError(
            f"{name} is a quantized graph ({', '.join(quantized)}); "
            "prune the float model, then quantize the result"
        )
    if not op_types & {"Conv", "ConvTranspose"}:
        raise UnsupportedModelError(
            f"{name} has no Conv or ConvTranspose node; sfp-onnx prunes convolutional networks"
        )
    _check_finite(model, name)


def _check_finite(model: onnx.ModelProto, name: str) -> None:
    """NaN or Inf weights make every comparison meaningless; refuse them up front."""
    for tensor in model.graph.initializer:
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        array = onnx.numpy_helper.to_array(tensor)
        if not np.isfinite(array).all():
            bad = "NaN" if np.isnan(array).any() else "Inf"
            raise InvalidModelError(
                f"{name}: weight {tensor.name!r} contains {bad} values; fix the model first"
            )


_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
)


def _default_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


class UnshareInitializersPass(ir.passes.InPlacePass):
    """Give every node its own copy of each initializer it reads.

    Exporters and simplifiers de-duplicate equal tensors (the zero biases of two convs become
    one initializer); slicing such a tensor for one conv must not slice it for the other.
    The copies are named ``<name>__<k>``; graph inputs and outputs are left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Duplicate each initializer once per extra node that reads it."""
        graph = model.graph
        modified = False
        for value in list(graph.initializers.values()):
            uses = list(value.uses())
            if len(uses) <= 1 or value.is_graph_output() or value.const_value is None:
                continue
            for k, (node, index) in enumerate(uses[1:], start=1):
                copy = ir.Value(
                    name=_fresh_name(graph, f"{value.name}__{k}"),
                    shape=value.shape,
                    type=value.type,
                    const_value=ir.tensor(value.const_value.numpy().copy()),
                )
                graph.register_initializer(copy)
                node.replace_input_with(index, copy)
                modified = True
        return ir.passes.PassResult(model, modified=modified)


class FoldConstantViewsPass(ir.passes.InPlacePass):
    """Turn Unsqueeze / Squeeze / Reshape of an initializer (constant axes or shape) into one.

    Cases: the legacy exporter writes a GroupNorm's scale as ``Mul(x, Unsqueeze(gamma))``;
    as the [C, 1, 1] initializer it is, the analysis can slice it per channel. Only the
    layout of the values changes, so the result is exact.
    """

    _VIEWS = frozenset({"Unsqueeze", "Squeeze", "Reshape"})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Fold every eligible node; the folded nodes are left for RemoveUnusedNodesPass."""
        modified = False
        for node in list(model.graph):
            array = self._fold(node)
            if array is None:
                continue
            name = _fresh_name(model.graph, f"{node.inputs[0].name}__{node.op_type.lower()}")
            value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            value.shape, value.dtype = ir.Shape(array.shape), node.inputs[0].dtype
            model.graph.register_initializer(value)
            node.outputs[0].replace_all_uses_with(value, replace_graph_outputs=False)
            modified = True
        if modified:
            common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)

    @classmethod
    def _fold(cls, node: ir.Node) -> np.ndarray | None:
        if node.op_type not in cls._VIEWS or node.domain not in ("", "ai.onnx"):
            return None
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or any(v.const_value is None for v in inputs):
            return None
        if node.outputs[0].is_graph_output():
            return None
        data = inputs[0].const_value.numpy()
        second = inputs[1].const_value.numpy() if len(inputs) > 1 else None
        if node.op_type == "Reshape":
            shape = [d if d != 0 else data.shape[i] for i, d in enumerate(second.tolist())]
            return data.reshape(shape)
        axes = second if second is not None else node.attributes.get("axes")
        axes = [] if axes is None else np.asarray(getattr(axes, "value", axes)).reshape(-1)
        if node.op_type == "Squeeze":
            return np.squeeze(data, axis=tuple(int(a) for a in axes) or None)
        rank = data.ndim + len(axes)
        return np.expand_dims(data, axis=tuple(sorted(int(a) % rank for a in axes)))


class ExplicitSplitSizesPass(ir.passes.InPlacePass):
    """Give every equal Split along a known axis its sizes, as a constant.

    Cases: Split-18's ``num_outputs`` and a Split with neither sizes nor ``num_outputs``
    (an equal split) become the same Split with the ``split`` input (opset 13+) or
    attribute; the sizes are those ONNX defines (equal, the last part smaller when the axis
    does not divide). Pruning then shrinks each size with its own channels. Splits whose
    axis length is unknown are left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewrite every eligible Split."""
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
        modified = False
        for node in model.graph:
            if node.op_type != "Split" or node.domain not in ("", "ai.onnx"):
                continue
            has_sizes = (len(node.inputs) > 1 and node.inputs[1] is not None) or (
                "split" in node.attributes
            )
            shape = node.inputs[0].shape
            axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
            if has_sizes or shape is None or not isinstance(shape[axis], int):
                continue
            sizes = _equal_split(shape[axis], len(node.outputs))
            node.attributes.pop("num_outputs", None)
            if opset >= 13:
                name = _fresh_name(model.graph, f"{node.name or 'split'}_sizes")
                array = np.asarray(sizes, dtype=np.int64)
                value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
                value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.INT64
                model.graph.register_initializer(value)
                node.resize_inputs(2)
                node.replace_input_with(1, value)
            else:
                node.attributes["split"] = ir.AttrInt64s("split", sizes)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _equal_split(length: int, parts: int) -> list[int]:
    """ONNX's equal split: ceil(length / parts) each, the last part what is left."""
    size = -(-length // parts)
    return [size] * (parts - 1) + [length - size * (parts - 1)]


def _fresh_name(graph: ir.Graph, name: str) -> str:
    candidate, k = name, 0
    while candidate in graph.initializers:
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def normalize_model(model: ir.Model) -> ir.Model:
    """Apply the semantics-preserving passes the analysis relies on, in place.

    Constants become initializers, Identity nodes go (weights that reach a Conv through an
    Identity become its direct inputs), constant Unsqueeze/Squeeze/Reshape become the
    initializers they make, initializers listed as graph inputs stop being inputs,
    every node gets private initializers, shapes are inferred, reads of static dims (and
    the integer maths on them) become constants, and equal Splits get their sizes.
    """
    passes = ir.passes.PassManager(
        [
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common_passes.IdentityEliminationPass(),
            common_passes.RemoveInitializersFromInputsPass(),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.NameFixPass(),
            FoldConstantViewsPass(),
            UnshareInitializersPass(),
            common_passes.TopologicalSortPass(),
        ]
    )
    passes(model)
    infer_shapes(model)
    _shape_reshapes_like_their_source(model)
    if fold_static_shape_reads(model):  # a legacy chunk: Slice(x, 0, Shape(x)[1] / 2)
        common_passes.RemoveUnusedNodesPass()(model)
        UnshareInitializersPass()(model)  # one folded end is often the next Slice's start
    ExplicitSplitSizesPass()(model)
    return model


def _shape_reshapes_like_their_source(model: ir.Model) -> None:
    """``Reshape(y, Shape(v))`` has ``v``'s shape; say so where inference could not.

    onnx's data propagation stops at a symbolic batch, so after a legacy GroupNorm
    (``Reshape(InstanceNorm(Reshape(v, [0, G, -1])), Shape(v))``) every shape is unknown.
    """
    for _ in range(8):  # one more GroupNorm sized per round, at most
        changed = False
        for node in model.graph:
            if node.op_type != "Reshape" or node.outputs[0].shape is not None:
                continue
            target = node.inputs[1].producer() if len(node.inputs) > 1 else None
            if target is None or target.op_type != "Shape" or target.attributes.get("end"):
                continue
            start = target.attributes.get("start")
            if (start is None or start.as_int() == 0) and target.inputs[0].shape is not None:
                node.outputs[0].shape = target.inputs[0].shape
                changed = True
        if not changed:
            return
        for node in model.graph:  # what inference guessed past the unknown shape, again
            for value in node.outputs:
                if value.shape is not None and any(
                    str(getattr(d, "value", "")).startswith("unk__") for d in value.shape
                ):
                    value.shape = None
        infer_shapes(model)


def infer_shapes(model: ir.Model) -> None:
    """Infer value shapes in place (a model's shapes are needed to size Flatten blocks)."""
    try:
        common_passes.ShapeInferencePass(strict_mode=False, data_prop=True)(model)
    except (
        Exception
    ) as exc:  # shape inference failing is not fatal: analysis blocks what it cannot size
        del exc


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read, check and normalise an ONNX model. The file itself is never modified."""
    proto = read_model_proto(path)
    check_model_proto(proto, str(path))
    model = ir.serde.deserialize_model(proto)
    return normalize_model(model)


def clone_model(model: ir.Model) -> ir.Model:
    """A deep copy (weights included) that can be rewritten without touching ``model``."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def save_model(
    model: ir.Model | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Write a model atomically; with external data (``<name>.data``) when large or asked.

    All files are first written into a temporary folder beside the target, then renamed into
    place (the data file before the model that points to it), so a crash or a full disk never
    leaves a partial model behind.
    """
    target = Path(path)
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    if external_data is None:
        external_data = proto.ByteSize() > threshold
    parent = target.parent if str(target.parent) else Path(".")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        staged = tmpdir / target.name
        data_name = f"{target.name}.data"
        if external_data:
            onnx.save_model(
                proto,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            os.replace(tmpdir / data_name, parent / data_name)
        else:
            onnx.save_model(proto, str(staged))
        os.replace(staged, target)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return target
