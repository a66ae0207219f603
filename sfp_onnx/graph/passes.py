"""Passes that prepare the training copy of a graph for onnx2torch.

This module owns the rewrites applied to the copy of the normalised graph that is converted to
torch, never to the graph that is sliced and written (:mod:`sfp_onnx.graph.load` owns that one).
Each pass is exact: at the graph's own input shape the rewritten graph computes the same outputs.

- :class:`FoldShapeArithmeticPass`: integer arithmetic on constants (the shape computations of
  a legacy export without constant folding) becomes constants, so shapes can be inferred.
- :class:`GatherAsReshapePass`: a Gather of ``arange`` indices (``as_strided``) is a Reshape;
  chained Reshapes merge, so the batch axis can be followed through them.
- :class:`ReshapeAllowZeroPass`: ``allowzero=1`` is dropped where the target has no 0 entry.
- :class:`BatchNormTrainingOutputsPass`: unused running-statistics outputs of a
  BatchNormalization exported in training mode are dropped; the node is marked so the import
  keeps its batch-statistics semantics (what onnxruntime computes for it).
- :class:`DynamicBatchPass`: a graph exported for a fixed batch gets a dynamic batch axis
  where that is exact: the input's dim 0, and the batch entry of Reshape and Expand targets.

:func:`prepare_training_graph` runs them on a clone and attaches inferred shapes.
:func:`fold_static_shapes` folds the shape reads of a fixed-shape graph, so that
:mod:`sfp_onnx.graph.measure` can size layers whose shapes a legacy export computes at run time.
Converters are :mod:`sfp_onnx.training.converters`; the conversion and weight links
:mod:`sfp_onnx.training.import_torch`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx.reference import ReferenceEvaluator

from sfp_onnx.errors import UnsupportedModelError

__all__ = [
    "BATCH_DIM",
    "BATCH_STATISTICS",
    "BatchNormTrainingOutputsPass",
    "DynamicBatchPass",
    "FoldShapeArithmeticPass",
    "GatherAsReshapePass",
    "ReshapeAllowZeroPass",
    "fixed_batch_outputs",
    "fold_static_shape_reads",
    "fold_static_shapes",
    "prepare_training_graph",
    "reinfer_shapes",
]

BATCH_DIM = "batch"  # name of the symbolic batch dimension of the training copy
# Node metadata key marking a BatchNormalization that normalises with its batch's statistics.
BATCH_STATISTICS = "sfp_onnx.batch_statistics"

# Ops folded when every input is an integer constant: shape arithmetic, never weights.
_SHAPE_ARITHMETIC = frozenset(
    {
        "Add", "Cast", "Concat", "ConstantOfShape", "Div", "Equal", "Expand", "Gather", "Max",
        "Min", "Mod", "Mul", "Neg", "Range", "ReduceProd", "Reshape", "Slice", "Squeeze", "Sub",
        "Tile", "Unsqueeze", "Where",
    }
)  # fmt: skip
_INTEGER_TYPES = frozenset({ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL})


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _new_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name, k = base, 0
    while name in graph.initializers:
        k += 1
        name = f"{base}_{k}"
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), value.const_value.dtype
    graph.register_initializer(value)
    return value


class FoldShapeArithmeticPass(ir.passes.InPlacePass):
    """Replace integer arithmetic on constants by its result.

    Cases: a node of :data:`_SHAPE_ARITHMETIC` whose inputs are all integer initializers is
    evaluated (onnx's reference runtime) and its outputs become initializers. Float nodes are
    never folded, so every weight stays the initializer the analysis names.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Fold in topological order, so chains of shape arithmetic fold at once."""
        opset = _opset(model)
        modified = False
        for node in list(model.graph):
            modified |= self._try_fold(model.graph, node, opset)
        if modified:
            common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _try_fold(graph: ir.Graph, node: ir.Node, opset: int) -> bool:
        inputs = [v for v in node.inputs if v is not None]
        if node.op_type not in _SHAPE_ARITHMETIC or node.domain not in ("", "ai.onnx"):
            return False
        if not inputs or any(
            v.const_value is None or v.const_value.dtype not in _INTEGER_TYPES for v in inputs
        ):
            return False
        outputs = [onnx.helper.make_empty_tensor_value_info(v.name) for v in node.outputs]
        proto = onnx.helper.make_model(
            onnx.helper.make_graph([ir.serde.serialize_node(node)], "fold", [], outputs),
            opset_imports=[onnx.helper.make_opsetid("", opset)],
        )
        try:
            results = ReferenceEvaluator(proto).run(None, {v.name: _constant(v) for v in inputs})
        except Exception:  # an op the reference runtime cannot run stays a node
            return False
        for output, array in zip(node.outputs, results, strict=True):
            folded = _new_initializer(graph, f"{output.name}__folded", np.asarray(array))
            output.replace_all_uses_with(folded, replace_graph_outputs=False)
        return True


class ReshapeAllowZeroPass(ir.passes.InPlacePass):
    """Drop ``allowzero=1`` from Reshapes whose constant target has no 0 entry.

    Cases: with no 0 in the target, ``allowzero`` changes nothing; onnx2torch's Reshape-14
    converter refuses the attribute. Targets computed at run time are left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewrite every eligible Reshape."""
        modified = False
        for node in model.graph:
            attr = node.attributes.get("allowzero")
            target = _constant(node.inputs[1]) if node.op_type == "Reshape" else None
            if attr is None or attr.as_int() != 1 or target is None or (target == 0).any():
                continue
            del node.attributes["allowzero"]
            modified = True
        return ir.passes.PassResult(model, modified=modified)


class BatchNormTrainingOutputsPass(ir.passes.InPlacePass):
    """Drop the unused running-statistics outputs of BatchNormalizations in training mode.

    Cases: a BatchNormalization with more than one output (opset 9-13: five outputs, opset
    14+: ``training_mode=1`` and three), the extra outputs unused. Such a node normalises with
    the statistics of its batch; the replacement has one output and the metadata
    :data:`BATCH_STATISTICS`, so the import keeps that semantics. Used outputs are left alone.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Replace each eligible node by its single-output equivalent."""
        modified = False
        for node in list(model.graph):
            if node.op_type != "BatchNormalization" or len(node.outputs) == 1:
                continue
            if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
                continue
            attributes = [a for name, a in node.attributes.items() if name != "training_mode"]
            single = ir.Node(
                node.domain, node.op_type, list(node.inputs), attributes, num_outputs=1,
                name=node.name, metadata_props={BATCH_STATISTICS: "1"},
            )  # fmt: skip
            model.graph.insert_before(node, single)
            node.outputs[0].replace_all_uses_with(single.outputs[0], replace_graph_outputs=True)
            single.outputs[0].shape, single.outputs[0].type = (
                node.outputs[0].shape,
                node.outputs[0].type,
            )
            model.graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


class GatherAsReshapePass(ir.passes.InPlacePass):
    """Turn a Gather that only reshapes into a Reshape, and merge chained Reshapes.

    Cases: (1) Gather on axis 0 of a 1-D value of static length n with constant indices
    ``arange(n).reshape(S)`` is ``Reshape(data, S)`` (the dynamo exporter writes
    ``as_strided`` of a contiguous tensor so). (2) ``Reshape(Reshape(x, a), b)``, the inner
    result used once and ``b`` a constant without 0 or -1 entries, is ``Reshape(x, b)``. Both
    keep the row-major order of the elements, so both are exact.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewrite every eligible node, then drop what became unused."""
        modified = any([self._gather(model.graph, node) for node in list(model.graph)])
        if modified:
            common_passes.RemoveUnusedNodesPass()(model)
        modified |= any([self._chain(node) for node in list(model.graph)])
        if modified:
            common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _gather(graph: ir.Graph, node: ir.Node) -> bool:
        data, indices = (*node.inputs, None, None)[:2]
        array = _constant(indices)
        attr = node.attributes.get("axis")
        if node.op_type != "Gather" or array is None or (attr is not None and attr.as_int() != 0):
            return False
        if data.shape is None or data.shape.rank() != 1 or not data.shape.is_static():
            return False
        if array.size != data.shape[0] or not np.array_equal(array.ravel(), np.arange(array.size)):
            return False
        target = _new_initializer(graph, f"{indices.name}__shape", np.array(array.shape, np.int64))
        reshape = ir.Node("", "Reshape", [data, target], name=f"{node.name}__reshape")
        graph.insert_before(node, reshape)
        reshape.outputs[0].type = node.outputs[0].type
        node.outputs[0].replace_all_uses_with(reshape.outputs[0], replace_graph_outputs=True)
        return True

    @staticmethod
    def _chain(node: ir.Node) -> bool:
        if node.op_type != "Reshape" or len(node.inputs) < 2:
            return False
        inner, target = node.inputs[0].producer(), _constant(node.inputs[1])
        if inner is None or inner.op_type != "Reshape" or target is None:
            return False
        if len(node.inputs[0].uses()) != 1 or (target <= 0).any():
            return False
        node.replace_input_with(0, inner.inputs[0])
        return True


def reinfer_shapes(model: ir.Model) -> None:
    """Infer every node output's shape afresh (stale shapes are cleared first), in place.

    When inference fails altogether the previous shapes are kept.
    """
    outputs = [output for node in model.graph for output in node.outputs]
    previous = [output.shape for output in outputs]
    for output in outputs:
        output.shape = None
    common_passes.ShapeInferencePass(strict_mode=False, data_prop=True)(model)
    if outputs and all(output.shape is None for output in outputs):
        for output, shape in zip(outputs, previous, strict=True):
            output.shape = shape


def _dim0(value: ir.Value | None) -> int | str | None:
    if value is None or value.shape is None or value.shape.rank() == 0:
        return None
    dim = value.shape[0]
    return dim if isinstance(dim, int) else dim.value


class DynamicBatchPass(ir.passes.InPlacePass):
    """Give a graph exported for a fixed batch B a dynamic batch axis, where that is exact.

    Cases: a fixed image input's dim 0 becomes :data:`BATCH_DIM`. Then, until nothing changes,
    with shapes inferred from the dynamic input: a Reshape whose input has the batch axis and
    whose output at batch B keeps dim 0 = B and the per-sample size gets the target
    ``[0, *per-sample dims]`` (rows map to rows, so this is exact at B and is the per-sample
    reshape at any batch); an Expand of a batch input to a target starting with B gets 1 there;
    ``Gather(Shape(x), k)`` of dims that stay static with a dynamic batch (the channels a
    ``chunk`` splits) becomes a constant, and the arithmetic on it is folded; a Reshape target
    computed from shapes becomes constant where each entry is static or copies the input's dim.
    What still fixes the batch is left as it is (:func:`fixed_batch_outputs` finds it).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Make the batch dynamic (if fixed) and fold the shape reads that stay static."""
        graph = model.graph
        image = graph.inputs[0]
        batch = _dim0(image)
        reinfer_shapes(model)
        static: dict[str, ir.Shape] = {}
        if isinstance(batch, int):
            static[image.name] = image.shape
            _record_static_shapes(graph, batch, static)
            image.shape = ir.Shape([BATCH_DIM, *list(image.shape)[1:]])
        modified, changed = isinstance(batch, int), True
        while changed:
            reinfer_shapes(model)
            _record_static_shapes(graph, batch, static)
            changed = any(
                [
                    _fold_static_shape_read(graph, n) or _fold_reshape_target(graph, n)
                    for n in list(graph)
                ]
            )
            if changed:
                FoldShapeArithmeticPass()(model)
            else:
                changed = any([self._rewrite(graph, node, batch, static) for node in list(graph)])
            modified |= changed
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _rewrite(graph: ir.Graph, node: ir.Node, batch: int, static: dict) -> bool:
        if node.op_type not in ("Reshape", "Expand") or _dim0(node.inputs[0]) != BATCH_DIM:
            return False
        target, out = _constant(node.inputs[1]), static.get(node.outputs[0].name)
        if target is None or out is None or not out.is_static() or out.rank() == 0:
            return False
        if node.op_type == "Reshape":
            sample = static.get(node.inputs[0].name)
            per_sample = (
                sample is not None
                and sample.is_static()
                and math.prod(list(sample)[1:]) == math.prod(list(out)[1:])
            )
            new = np.array([0, *list(out)[1:]], dtype=np.int64)
            if out[0] != batch or not per_sample or 0 in new[1:]:
                return False
        else:
            if (
                target.size != out.rank()
                or target[0] != batch
                or node.inputs[0].shape.rank() != out.rank()
            ):
                return False
            new = target.astype(np.int64).copy()
            new[0] = 1
        if np.array_equal(target, new):
            return False
        node.replace_input_with(1, _new_initializer(graph, f"{node.inputs[1].name}__batch", new))
        if node.op_type == "Reshape":
            node.attributes.pop("allowzero", None)
        return True


def _record_static_shapes(
    graph: ir.Graph, batch: int | str | None, static: dict[str, ir.Shape]
) -> None:
    """Add the shapes at batch ``batch`` that the dynamic-batch inference now determines.

    The rewritten graph computes at batch B what the original did, so its shapes with the
    batch dim set to B are the original's (some only become known once shapes are folded).
    """
    for node in graph:
        for value in node.outputs:
            if value.name in static or value.shape is None:
                continue
            dims = [batch if getattr(d, "value", None) == BATCH_DIM else d for d in value.shape]
            if all(isinstance(d, int) for d in dims):
                static[value.name] = ir.Shape(dims)


def _fold_static_shape_read(graph: ir.Graph, node: ir.Node) -> bool:
    """Replace ``Gather(Shape(x), const)``, or ``Shape(x)`` itself, by a constant when the
    dims it reads are static."""
    if node.op_type == "Shape" and not node.attributes and node.inputs[0].shape is not None:
        dims = list(node.inputs[0].shape)
        if not node.outputs[0].uses():
            return False  # folded already (the node goes with the unused ones)
        if not dims or not all(isinstance(d, int) for d in dims):
            return False
        folded = _new_initializer(graph, f"{node.outputs[0].name}__static", np.array(dims))
        node.outputs[0].replace_all_uses_with(folded, replace_graph_outputs=False)
        return True
    if node.op_type != "Gather" or len(node.inputs) != 2 or not node.outputs[0].uses():
        return False
    shape_node, indices = node.inputs[0].producer(), _constant(node.inputs[1])
    if shape_node is None or shape_node.op_type != "Shape" or indices is None:
        return False
    source = shape_node.inputs[0]
    if source.shape is None or "start" in shape_node.attributes or "end" in shape_node.attributes:
        return False
    dims = list(source.shape)
    picked = [dims[int(k)] for k in indices.reshape(-1)]
    if not all(isinstance(d, int) for d in picked):
        return False
    array = np.array(picked, dtype=np.int64).reshape(indices.shape)
    folded = _new_initializer(graph, f"{node.outputs[0].name}__static", array)
    node.outputs[0].replace_all_uses_with(folded, replace_graph_outputs=False)
    return True


def _shape_vector(value: ir.Value | None, depth: int = 0) -> list[int | str] | None:
    """The entries of a 1-D int64 shape computation: ints, or names of symbolic dims.

    Follows Shape, Gather (axis 0, constant indices), Unsqueeze/Squeeze/Cast of such values,
    Concat and constants; anything else (or an unknown dim) gives None.
    """
    array = _constant(value)
    if array is not None:
        return [int(v) for v in array.reshape(-1)] if array.dtype.kind in "iu" else None
    node = value.producer() if value is not None else None
    if node is None or depth > 16:
        return None
    if node.op_type == "Shape" and not node.attributes and node.inputs[0].shape is not None:
        dims = [d if isinstance(d, int) else d.value for d in node.inputs[0].shape]
        return None if None in dims else dims
    parts = [_shape_vector(v, depth + 1) for v in node.inputs[:1]]
    if node.op_type in ("Unsqueeze", "Squeeze", "Cast"):
        return parts[0]
    if node.op_type == "Gather" and parts[0] is not None and _constant(node.inputs[1]) is not None:
        axis = node.attributes.get("axis")
        if axis is None or axis.as_int() == 0:
            return [parts[0][int(k)] for k in _constant(node.inputs[1]).reshape(-1)]
    if node.op_type == "Concat":
        pieces = [_shape_vector(v, depth + 1) for v in node.inputs]
        return None if None in pieces else [d for piece in pieces for d in piece]
    return None


def _fold_reshape_target(graph: ir.Graph, node: ir.Node) -> bool:
    """Make a run-time Reshape target constant when each entry is static or copies its dim.

    An entry that reads the input's own dim at the same position (the batch of
    ``x.view(x.size(0), ...)``) becomes 0, which copies that dim: exact at every size.
    """
    if node.op_type != "Reshape" or _constant(node.inputs[1]) is not None:
        return False
    entries, source = _shape_vector(node.inputs[1]), node.inputs[0].shape
    if entries is None or source is None:
        return False
    dims = [d if isinstance(d, int) else d.value for d in source]
    copied = [
        0 if isinstance(e, str) and k < len(dims) and dims[k] == e else e
        for k, e in enumerate(entries)
    ]
    if not all(isinstance(e, int) for e in copied) or 0 in entries:
        return False
    target = _new_initializer(graph, f"{node.inputs[1].name}__static", np.array(copied, np.int64))
    node.replace_input_with(1, target)
    node.attributes.pop("allowzero", None)
    return True


def fold_static_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` in which reads of static dims, and the integer maths on them, are
    constants, so that shape inference sizes what they feed (ShuffleNet's channel split of a
    legacy export is ``Slice(x, 0, Shape(x)[1] / 2)``; onnx's data propagation stops at Div).
    """
    model = ir.serde.deserialize_model(proto)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    fold_static_shape_reads(model)
    return ir.serde.serialize_model(model)


def fold_static_shape_reads(model: ir.Model) -> bool:
    """In place: reads of static dims, and the integer maths on them, become constants.

    Exact at every input size: only dims the graph fixes are read (a symbolic batch stays a
    Shape read). Returns True if anything was folded.
    """
    # Shapes known before stay as they were (symbolic dims keep their names: re-inference
    # would rename a "batch" after a Reshape to "unk__0"); folding only adds shapes.
    known = [(v, v.shape) for n in model.graph for v in n.outputs if v.shape is not None]
    interface = [(value, value.shape) for value in model.graph.outputs]
    folded, changed = False, True
    while changed:
        changed = FoldShapeArithmeticPass()(model).modified
        reinfer_shapes(model)  # a Shape read is folded only where its input's dims are known
        changed |= any([_fold_static_shape_read(model.graph, n) for n in list(model.graph)])
        folded |= changed
    for value, shape in [*known, *interface]:
        value.shape = shape
    return folded


def fixed_batch_outputs(graph: ir.Graph) -> list[str]:
    """Outputs of a graph with a dynamic batch input whose dim 0 is still a fixed number."""
    if _dim0(graph.inputs[0]) != BATCH_DIM:
        return []
    return [v.name for v in graph.outputs if isinstance(_dim0(v), int)]


def _pinning_node(graph: ir.Graph) -> str:
    """The first node that turns a batch-sized input into a fixed-size output, in words."""
    for node in graph:
        ins = any(_dim0(v) == BATCH_DIM for v in node.inputs if v is not None)
        outs = [_dim0(v) for v in node.outputs]
        if ins and node.op_type not in ("Shape", "Size") and BATCH_DIM not in outs:
            return f"first at {node.op_type} node {node.name!r}"
    return "no node found that fixes it"


def prepare_training_graph(model: ir.Model) -> onnx.ModelProto:
    """The training copy of a normalised model, as a proto with inferred shapes.

    ``model`` is left untouched.

    Raises:
        UnsupportedModelError: a fixed batch that cannot be made dynamic exactly.
    """
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    batch = _dim0(copy.graph.inputs[0])
    for rewrite in (
        FoldShapeArithmeticPass(),
        GatherAsReshapePass(),
        ReshapeAllowZeroPass(),
        BatchNormTrainingOutputsPass(),
        DynamicBatchPass(),
    ):
        rewrite(copy)
    reinfer_shapes(copy)
    pinned = fixed_batch_outputs(copy.graph)
    if pinned:
        raise UnsupportedModelError(
            f"the model is exported for a fixed batch of {batch} and its batch axis cannot be "
            f"made dynamic exactly (output {pinned[0]!r}, {_pinning_node(copy.graph)}); "
            "re-export it with a dynamic batch axis"
        )
    return ir.serde.serialize_model(copy)
