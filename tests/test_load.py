"""Loading: bad inputs fail with one clear line; normalisation keeps the graph's meaning.

Graph cases: files that are not ONNX models at all, truncated protobuf, external data
missing, a graph without Conv, quantized graphs (QLinearConv and QDQ), an opset the tool
cannot read; initializers shared by two convs (de-duplicated zero biases), Conv weights fed
through an Identity, weights held in Constant nodes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from sfp_onnx.cli.main import main

import sfp_onnx
from sfp_onnx.runtime.session import create_session
from tests.exports import ResidualNet, export, randomize_norms


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("good") / "net.onnx"
    return export(randomize_norms(ResidualNet(width=8)), path, "kept17", size=32)


def _digest(path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _run_cli(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _conv_graph(op_types: list[str] | None = None, opset: int = 17) -> onnx.ModelProto:
    """x -> Conv(w, b) -> y, with extra nodes from op_types appended as a chain."""
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [w, b],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _write(path, proto: onnx.ModelProto):
    path.write_bytes(proto.SerializeToString())
    return path


def _bad_inputs(tmp_path, good_model):
    yield "missing", tmp_path / "nope.onnx", "no such file"
    yield "empty", _touch(tmp_path / "empty.onnx", b""), "is empty"
    yield (
        "text",
        _touch(tmp_path / "notes.onnx", b"hello, this is not a model\n" * 50),
        "not an ONNX",
    )
    data = good_model.read_bytes()
    yield "truncated", _touch(tmp_path / "cut.onnx", data[: len(data) // 2]), "not an ONNX"
    mlp = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "mlp",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    yield "no conv", _write(tmp_path / "mlp.onnx", mlp), "no Conv"
    yield "quantized", _write(tmp_path / "q.onnx", _qdq_model()), "quantized"
    yield "new opset", _write(tmp_path / "op99.onnx", _conv_graph(opset=99)), "opset 99"
    external = _conv_graph()
    onnx.save_model(
        external, str(tmp_path / "ext.onnx"), save_as_external_data=True,
        all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0,
    )  # fmt: skip
    (tmp_path / "ext.onnx.data").unlink()
    yield "external data missing", tmp_path / "ext.onnx", "ext.onnx.data, which is missing"
    nan = _conv_graph()
    nan.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.full((4, 3, 1, 1), np.nan, np.float32), "w")
    )
    yield "nan weights", _write(tmp_path / "nan.onnx", nan), "contains NaN"


def _touch(path, data: bytes):
    path.write_bytes(data)
    return path


def _qdq_model() -> onnx.ModelProto:
    model = _conv_graph()
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "z")
    model.graph.initializer.extend([scale, zero])
    q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q")
    dq = helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq")
    model.graph.node[0].input[0] = "xd"
    model.graph.node.insert(0, dq)
    model.graph.node.insert(0, q)
    return model


@pytest.mark.parametrize("command", ["analyze", "slim", "prune"])
def test_bad_inputs_give_one_line_and_no_output(tmp_path, good_model, command):
    for label, path, expected in _bad_inputs(tmp_path, good_model):
        before = _digest(path)
        out = tmp_path / f"{label}.out.onnx"
        args = {"analyze": [], "slim": ["-o", str(out)], "prune": ["-o", str(out), "--rate", "0.3"]}
        result = _run_cli([command, str(path), *args[command]])
        lines = result.output.strip().splitlines()
        assert result.exit_code != 0, label
        assert len(lines) == 1 and lines[0].startswith("error: "), (label, result.output)
        assert expected in lines[0], (label, lines[0])
        assert "Traceback" not in result.output
        assert not out.exists(), label
        assert _digest(path) == before, f"{label}: input changed"
        assert not list(tmp_path.glob(".*.tmp")), "no temporary files left behind"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--rate", "1.0"], "rate must be in [0, 1)"),
        (["--rate", "-0.1"], "rate must be in [0, 1)"),
    ],
)
def test_bad_options_give_one_line(tmp_path, good_model, args, expected):
    out = tmp_path / "out.onnx"
    result = _run_cli(["prune", str(good_model), "-o", str(out), *args])
    assert result.exit_code != 0 and expected in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_output_equal_to_input_is_refused(tmp_path, good_model):
    copy = tmp_path / "m.onnx"
    copy.write_bytes(good_model.read_bytes())
    before = _digest(copy)
    result = _run_cli(["prune", str(copy), "-o", str(copy), "--rate", "0.3"])
    assert result.exit_code != 0 and "is the input model" in result.output
    assert _digest(copy) == before


def test_output_directory_missing_is_refused(tmp_path, good_model):
    result = _run_cli(["slim", str(good_model), "-o", str(tmp_path / "no" / "dir" / "m.onnx")])
    assert result.exit_code != 0 and "does not exist" in result.output


def _shared_bias_model() -> onnx.ModelProto:
    """Two parallel convs sharing one zero-bias initializer, and a Constant-node weight."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w2")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "shared_bias")
    w3 = helper.make_tensor(
        "w3", TensorProto.FLOAT, (4, 16, 1, 1), rng.standard_normal(64).tolist()
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1", "shared_bias"], ["a"], name="c1", pads=[1] * 4),
        helper.make_node("Identity", ["w2"], ["w2_id"], name="id"),
        helper.make_node("Conv", ["x", "w2_id", "shared_bias"], ["b"], name="c2", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ra"], name="r1"),
        helper.make_node("Relu", ["b"], ["rb"], name="r2"),
        helper.make_node("Concat", ["ra", "rb"], ["cat"], name="cat", axis=1),
        helper.make_node("Constant", [], ["w3c"], name="const", value=w3),
        helper.make_node("Conv", ["cat", "w3c"], ["y"], name="c3"),
    ]
    graph = helper.make_graph(
        nodes, "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [w1, w2, bias],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_shared_initializers_identity_weights_and_constants(tmp_path):
    source = _write(tmp_path / "shared.onnx", _shared_bias_model())
    out = tmp_path / "slim.onnx"
    result = sfp_onnx.prune(source, out, rate=0.5, save_masked=tmp_path / "masked.onnx")
    model = onnx.load(str(out))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    convs = {n.name: [shapes.get(i) for i in n.input[1:]] for n in model.graph.node}
    assert convs["c1"] == [(4, 3, 3, 3), (4,)]
    assert convs["c2"] == [(4, 3, 3, 3), (4,)], "the shared bias is sliced for each conv alone"
    assert convs["c3"] == [(4, 8, 1, 1)], "the Constant weight loses the concat's removed columns"
    assert result.verification.exact
    feed = {"x": np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)}
    y_masked = create_session(tmp_path / "masked.onnx", provider="cpu").run(None, feed)[0]
    y_slim = create_session(out, provider="cpu").run(None, feed)[0]
    assert np.abs(y_masked - y_slim).max() <= 1e-5 * np.abs(y_masked).max()


def test_external_data_in_and_out(tmp_path, good_model, monkeypatch):
    """A model with external data is read, verified through files and written the same way."""
    import sfp_onnx.runtime.verify

    source = tmp_path / "ext" / "net.onnx"
    source.parent.mkdir()
    onnx.save_model(
        onnx.load(str(good_model)), str(source), save_as_external_data=True,
        all_tensors_to_one_file=True, location="net.onnx.data", size_threshold=0,
    )  # fmt: skip
    monkeypatch.setattr(sfp_onnx.runtime.verify, "FILE_THRESHOLD", 0)  # as if it were over 2 GB
    out = tmp_path / "out" / "slim.onnx"
    out.parent.mkdir()
    result = sfp_onnx.prune(source, out, rate=0.3, external_data=True)
    assert result.verification.exact
    assert (out.parent / "slim.onnx.data").exists()
    assert out.stat().st_size < 20_000, "the weights live in the data file"
    assert (
        result.after.file_bytes
        == out.stat().st_size + (out.parent / "slim.onnx.data").stat().st_size
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["slim.onnx", "slim.onnx.data"]
    feed = {"input": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    assert create_session(out, provider="cpu").run(None, feed)[0].shape == (2, 10)
