"""The extra onnx2torch converters, each against onnxruntime on a one-node graph.

Graph case: one node of the op and version under test (the graph's opset is that version, so
the registry resolves to exactly that converter), float inputs from a seeded generator,
attributes and constant inputs as the exporters write them. The torch module onnx2torch
builds must give onnxruntime's outputs. Refusals name the op, its version and the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sfp_onnx.runtime.session import create_session
from sfp_onnx.training.converters import REGISTERED, TYPE_ONLY_VERSIONS
from sfp_onnx.training.import_torch import _conversion_failures

torch.set_num_threads(1)
X = np.random.default_rng(0).standard_normal((2, 3, 7, 6)).astype(np.float32)


def _model(node, opset: int, inputs: dict, consts: dict, out_types: dict) -> onnx.ModelProto:
    """A model of ``node``: ``inputs`` as graph inputs, ``consts`` as initializers."""
    graph = helper.make_graph(
        [node],
        "one_node",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in inputs.items()
        ],
        [
            helper.make_tensor_value_info(n, out_types.get(n, TensorProto.FLOAT), None)
            for n in node.output
        ],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
    )


def _compare(node, opset: int, inputs=None, consts=None, out_types=None):
    """Run the model in onnxruntime and as the onnx2torch module; outputs must agree."""
    import onnx2torch

    inputs = {"x": X} if inputs is None else inputs
    model = _model(node, opset, inputs, consts or {}, out_types or {})
    expected = create_session(model.SerializeToString(), provider="cpu").run(None, inputs)
    module = onnx2torch.convert(model).eval()
    with torch.no_grad():
        got = module(*[torch.from_numpy(a) for a in inputs.values()])
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.shape == theirs.shape and ours.numpy().dtype == theirs.dtype
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5, atol=1e-6)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


REDUCE_CASES = [
    ("ReduceMean", 18, {"keepdims": 1}, _i64(2, 3)),
    ("ReduceMean", 18, {"keepdims": 0}, _i64(-1)),
    ("ReduceMean", 18, {"keepdims": 1}, None),
    ("ReduceMean", 18, {"noop_with_empty_axes": 1}, None),
    ("ReduceMax", 18, {"keepdims": 0}, _i64(1, 3)),
    ("ReduceMax", 20, {"keepdims": 1}, _i64(2)),
    ("ReduceMin", 18, {"keepdims": 1}, _i64(0, 2)),
    ("ReduceMin", 20, {"keepdims": 0}, None),
    ("ReduceL1", 18, {"keepdims": 1}, _i64(2, 3)),
    ("ReduceL2", 18, {"keepdims": 0}, _i64(1)),
    ("ReduceSumSquare", 18, {"keepdims": 1}, _i64(3)),
    ("ReduceLogSumExp", 18, {"keepdims": 1}, _i64(1, 2)),
    ("ReduceLogSum", 18, {"keepdims": 0}, _i64(2, 3)),
]


@pytest.mark.parametrize(("op", "version", "attrs", "axes"), REDUCE_CASES)
def test_reduce(op, version, attrs, axes):
    """Reduce*-18/20: axes from a constant input, absent, or empty with noop."""
    inputs = ["x", "axes"] if axes is not None else ["x"]
    node = helper.make_node(op, inputs, ["y"], **attrs)
    x = {"x": np.abs(X) + 0.5} if op == "ReduceLogSum" else None
    _compare(node, version, x, {"axes": axes} if axes is not None else {})


@pytest.mark.parametrize("version", [19, 21, 23])
@pytest.mark.parametrize(
    ("shape", "allowzero", "x_shape"),
    [
        (_i64(0, 3, -1), 0, (2, 3, 7, 6)),  # 0 copies the input's dim
        (_i64(2, 126), 1, (2, 3, 7, 6)),  # allowzero=1 without a 0 entry
        (_i64(3, 0), 1, (0, 3)),  # allowzero=1: 0 is an empty dim
    ],
)
def test_reshape(version, shape, allowzero, x_shape):
    """Reshape-19/21/23 with a constant target, ``allowzero`` 0 or 1."""
    x = np.zeros(x_shape, np.float32) if 0 in x_shape else X.reshape(x_shape)
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=allowzero)
    _compare(node, version, {"x": x}, {"shape": shape})


def test_reshape_target_computed_at_run_time():
    """Reshape-19 whose target is a graph input (onnx2torch reads it at run time)."""
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    _compare(node, 19, {"x": X, "shape": _i64(0, -1)})


@pytest.mark.parametrize(
    ("outputs", "attrs", "split"),
    [
        (2, {"axis": 0, "num_outputs": 2}, None),
        (3, {"axis": 2, "num_outputs": 3}, None),  # 7 rows: 3, 3, 1
        (2, {"axis": -1}, _i64(2, 4)),
    ],
)
def test_split(outputs, attrs, split):
    """Split-18: ``num_outputs`` equal parts (the last smaller) or constant sizes."""
    names = [f"y{k}" for k in range(outputs)]
    node = helper.make_node("Split", ["x", "split"] if split is not None else ["x"], names, **attrs)
    _compare(node, 18, consts={"split": split} if split is not None else {})


@pytest.mark.parametrize("version", [19, 22])
@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel_shape": [2, 2], "strides": [2, 2]},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
        {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1, "dilations": [1, 1]},
    ],
)
def test_average_pool(version, attrs):
    """AveragePool-19/22 (DenseNet's transitions): padding, count_include_pad, ceil_mode."""
    _compare(helper.make_node("AveragePool", ["x"], ["y"], **attrs), version)


def test_average_pool_1d():
    """AveragePool-19 on a 3-D input: the rank comes from kernel_shape, not inferred shapes."""
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3], strides=[2])
    _compare(node, 19, {"x": X.reshape(2, 21, 6)})


@pytest.mark.parametrize("version", [18, 19, 21, 23])
@pytest.mark.parametrize(
    ("mode", "pads", "axes", "value"),
    [
        ("constant", _i64(0, 0, 1, 2, 0, 0, 3, 0), None, np.float32(0.5)),
        ("constant", _i64(1, 2, 0, 1), _i64(2, -1), None),
        ("reflect", _i64(2, 1, 1, 2), _i64(2, 3), None),
        ("edge", _i64(0, 0, 1, 1, 0, 0, 2, 2), None, None),
        ("constant", _i64(0, 0, -1, 2, 0, 0, -2, 1), None, None),  # negative pads crop
    ],
)
def test_pad(version, mode, pads, axes, value):
    """Pad-18/19/21/23: constant/reflect/edge, a constant value, ``axes`` (18+)."""
    names = ["x", "pads", "value" if value is not None else "", "axes" if axes is not None else ""]
    while names[-1] == "":
        names.pop()
    consts = {"pads": pads, "value": value, "axes": axes}
    node = helper.make_node("Pad", names, ["y"], mode=mode)
    _compare(node, version, consts={k: v for k, v in consts.items() if v is not None})


@pytest.mark.parametrize("version", [19, 21, 23])
def test_pad_wrap(version):
    """Pad-19+: ``wrap`` (torch's circular padding)."""
    node = helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap")
    _compare(node, version, consts={"pads": _i64(0, 0, 1, 2, 0, 0, 2, 1)})


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    """Gelu-20 (ConvNeXt's MLP), exact and tanh-approximated."""
    _compare(helper.make_node("Gelu", ["x"], ["y"], approximate=approximate), 20)


# op -> (inputs, constant inputs, attributes, output type): one graph per type-only version.
_W = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)
TYPE_ONLY_CASES = {
    "Cast": ({}, {"to": TensorProto.FLOAT}, TensorProto.FLOAT),
    "Constant": ({}, {"value": numpy_helper.from_array(X[0])}, TensorProto.FLOAT),
    "ConstantOfShape": ({"s": _i64(2, 3)}, {"value": helper.make_tensor("v", 1, [1], [0.5])},
                        TensorProto.FLOAT),
    "Conv": ({"w": _W}, {"pads": [1, 1, 1, 1]}, TensorProto.FLOAT),
    "ConvTranspose": ({"w": _W[:3]}, {"strides": [2, 2]}, TensorProto.FLOAT),
    "Dropout": ({}, {}, TensorProto.FLOAT),
    "Elu": ({}, {"alpha": 0.7}, TensorProto.FLOAT),
    "Equal": ({"b": np.round(X)}, {}, TensorProto.BOOL),
    "Flatten": ({}, {"axis": 2}, TensorProto.FLOAT),
    "GlobalAveragePool": ({}, {}, TensorProto.FLOAT),
    "HardSigmoid": ({}, {"alpha": 0.2, "beta": 0.4}, TensorProto.FLOAT),
    "HardSwish": ({}, {}, TensorProto.FLOAT),
    "Identity": ({}, {}, TensorProto.FLOAT),
    "InstanceNormalization": ({"s": X[0, :, 0, 0], "b": X[1, :, 0, 0]}, {}, TensorProto.FLOAT),
    "MaxPool": ({}, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
                TensorProto.FLOAT),
    "Shape": ({}, {}, TensorProto.INT64),
    "Softplus": ({}, {}, TensorProto.FLOAT),
    "Squeeze": ({"axes": _i64(0)}, {}, TensorProto.FLOAT),
    "Transpose": ({}, {"perm": [0, 2, 3, 1]}, TensorProto.FLOAT),
    "Unsqueeze": ({"axes": _i64(1, -1)}, {}, TensorProto.FLOAT),
}  # fmt: skip


@pytest.mark.parametrize(
    ("op", "version"),
    [(op, v) for op, (_, versions) in TYPE_ONLY_VERSIONS.items() for v in versions],
)
def test_type_only_version(op, version):
    """A version that only added element types converts as the version before it."""
    consts, attrs, out_type = TYPE_ONLY_CASES[op]
    no_x = op in ("Constant", "ConstantOfShape")
    names = [] if no_x else ["x"]
    node = helper.make_node(op, [*names, *consts], ["y"], **attrs)
    inputs = {"s": consts["s"]} if op == "ConstantOfShape" else ({} if no_x else {"x": X[:1]})
    consts = {} if op == "ConstantOfShape" else consts
    _compare(node, version, inputs, consts, {"y": out_type})


def test_every_missing_version_is_registered_here():
    """The versions the exporters write are ours (onnx2torch 1.5.15 has none of them)."""
    for pair in [("ReduceMean", 18), ("Reshape", 19), ("Split", 18), ("AveragePool", 19),
                 ("Pad", 18), ("Pad", 19), ("Gelu", 20), ("Reshape", 21), ("Pad", 21)]:  # fmt: skip
        assert pair in REGISTERED


@pytest.mark.parametrize(
    ("node", "version", "reason"),
    [
        (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2]),
         19, "AveragePool-19: AveragePool with dilations > 1"),
        (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
         19, "AveragePool-19: AveragePool with asymmetric pads"),
        (helper.make_node("Gelu", ["x"], ["y"], approximate="erf"), 20,
         "Gelu-20: Gelu approximate='erf'"),
    ],
)  # fmt: skip
def test_refusals_name_the_op_version_and_reason(node, version, reason):
    """What a converter cannot reproduce exactly is refused with its reason, not approximated."""
    assert _conversion_failures(_model(node, version, {"x": X}, {}, {})) == [reason]
