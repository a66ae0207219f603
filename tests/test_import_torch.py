"""Import into torch: the training copy's passes, trainable weights, links and refusals.

Graph cases: a ResidualNet exported in training mode (BatchNormalization with running-
statistics outputs, opset 13 and 17); small hand-built graphs with a fixed batch (Reshape with
``allowzero=1``, an Expand to the batch, a batch merged into the channels); two MatMul
weights of equal values; ops onnx2torch has no converter for. Every import is checked against
onnxruntime, and the graph that is written stays as it was.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from sfp_onnx.cli.main import main

import sfp_onnx
from sfp_onnx.errors import UnsupportedModelError
from sfp_onnx.graph.load import load_model
from sfp_onnx.runtime.session import create_session
from sfp_onnx.training.import_torch import BatchStatisticsNorm, import_model, write_back
from tests.exports import ResidualNet, cifar10_root, cifar_images, randomize_norms

torch.set_num_threads(1)
RNG = np.random.default_rng(0)


def _weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) * 0.3, name)


def _save(tmp_path, nodes, initializers, batch=1, opset=17, name="net") -> str:
    """A classifier graph with input ``input`` [batch, 3, 8, 8] and output ``logits``."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return str(path)


def _check_exact(path: str, module: torch.nn.Module, count: int = 4) -> None:
    """Torch at batch ``count`` against onnxruntime run at the file's own batch."""
    session = create_session(path, provider="cpu", threads=1)
    shape = session.get_inputs()[0].shape
    images = RNG.standard_normal((count, *shape[1:])).astype(np.float32)
    step = shape[0] if isinstance(shape[0], int) else count
    reference = np.concatenate(
        [session.run(None, {"input": images[k : k + step]})[0] for k in range(0, count, step)]
    )
    with torch.no_grad():
        ours = module.eval()(torch.from_numpy(images)).numpy()
    assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max()


def _stem(out: str = "c") -> list:
    return [
        helper.make_node("Conv", ["input", "w"], [out + "0"], pads=[1] * 4),
        helper.make_node("Relu", [out + "0"], [out]),
    ]


@pytest.mark.parametrize("opset", [13, 17])
def test_training_mode_batchnorm_keeps_batch_statistics(opset, tmp_path):
    """BatchNormalization exported in training mode (extra outputs) normalises with the batch."""
    path = tmp_path / f"train{opset}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            randomize_norms(ResidualNet(width=8)), torch.randn(2, 3, 32, 32), str(path),
            dynamo=False, opset_version=opset, training=torch.onnx.TrainingMode.TRAINING,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
    assert any(len(n.output) > 1 for n in onnx.load(str(path)).graph.node)
    model = load_model(path)
    imported = import_model(model)
    norms = [m for m in imported.module.modules() if isinstance(m, BatchStatisticsNorm)]
    assert len(norms) == sum(n.op_type == "BatchNormalization" for n in model.graph)
    images = cifar_images(count=4, size=32)
    reference = create_session(path, provider="cpu").run(None, {"input": images})[0]
    with torch.no_grad():
        ours = imported.module.eval()(torch.from_numpy(images)).numpy()
    assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max()
    assert "stem.1.running_mean" in imported.links


def test_allowzero_reshape_and_fixed_batch(tmp_path):
    """Reshape-14 with allowzero=1 and a [1, 8] target: imports, runs at batch 4, model kept."""
    nodes = [
        *_stem(),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["f"], allowzero=1),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    shape = numpy_helper.from_array(np.array([1, 8], np.int64), "shape")
    path = _save(tmp_path, nodes, [_weight("w", 8, 3, 3, 3), shape, _weight("fc", 10, 8)])
    model = load_model(path)
    before = ir.serde.serialize_model(model).SerializeToString()
    imported = import_model(model)
    _check_exact(path, imported.module)
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_expand_to_a_fixed_batch_of_two(tmp_path):
    """An Expand of a batch-2 value to [2, 8, 8, 8] gets the dynamic batch (target [1, ...])."""
    nodes = [
        *_stem(),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Expand", ["g", "to"], ["e"]),
        helper.make_node("Mul", ["e", "c"], ["m"]),
        helper.make_node("GlobalAveragePool", ["m"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    to = numpy_helper.from_array(np.array([2, 8, 8, 8], np.int64), "to")
    path = _save(tmp_path, nodes, [_weight("w", 8, 3, 3, 3), to, _weight("fc", 10, 8)], batch=2)
    _check_exact(path, import_model(load_model(path)).module, count=6)


def test_as_strided_gather_becomes_a_reshape(tmp_path):
    """Reshape to [-1] then Gather of arange indices (dynamo's as_strided) follows the batch."""
    nodes = [
        *_stem(),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Reshape", ["g", "flat"], ["v"]),  # [1, 8, 1, 1] -> [8]
        helper.make_node("Gather", ["v", "idx"], ["s"], axis=0),  # -> [1, 8, 1, 1]
        helper.make_node("Reshape", ["s", "row"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    consts = [
        numpy_helper.from_array(np.array([-1], np.int64), "flat"),
        numpy_helper.from_array(np.arange(8, dtype=np.int64).reshape(1, 8, 1, 1), "idx"),
        numpy_helper.from_array(np.array([1, 8], np.int64), "row"),
    ]
    path = _save(tmp_path, nodes, [_weight("w", 8, 3, 3, 3), *consts, _weight("fc", 10, 8)])
    _check_exact(path, import_model(load_model(path)).module)


def test_a_batch_merged_into_channels_is_refused_with_the_node(tmp_path):
    """A Reshape that folds the batch into another axis cannot be made dynamic: named."""
    nodes = [
        *_stem(),
        helper.make_node("Reshape", ["c", "merged"], ["r"]),  # [1, 8, 8, 8] -> [8, 64]
        helper.make_node("ReduceMean", ["r"], ["m"], axes=[1], keepdims=0),
        helper.make_node("Reshape", ["m", "row"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    consts = [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("merged", [8, 64]), ("row", [1, 8]))]  # fmt: skip
    path = _save(tmp_path, nodes, [_weight("w", 8, 3, 3, 3), *consts, _weight("fc", 10, 8)])
    with pytest.raises(UnsupportedModelError, match=r"fixed batch of 1 .* Reshape node"):
        import_model(load_model(path))


def test_equal_weights_link_to_their_own_tensors(tmp_path):
    """Two MatMul weights with equal values: each is its own parameter and is written back."""
    nodes = [
        *_stem(),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "m1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "m2"], ["h2"]),
        helper.make_node("Gemm", ["h2", "fc"], ["logits"], transB=1),
    ]
    m1 = _weight("m1", 8, 8)
    m2 = numpy_helper.from_array(numpy_helper.to_array(m1).copy(), "m2")
    path = _save(tmp_path, nodes, [_weight("w", 8, 3, 3, 3), m1, m2, _weight("fc", 10, 8)])
    model = load_model(path)
    imported = import_model(model)
    _check_exact(path, imported.module)
    parameters = {id(p) for p in imported.module.parameters()}
    assert {id(imported.tensor("m1")), id(imported.tensor("m2"))} <= parameters
    with torch.no_grad():
        imported.tensor("m2").mul_(2.0)
    write_back(imported, model)
    values = {n: model.graph.initializers[n].const_value.numpy() for n in ("m1", "m2")}
    np.testing.assert_array_equal(values["m1"], numpy_helper.to_array(m1))
    np.testing.assert_array_equal(values["m2"], 2.0 * numpy_helper.to_array(m1))


def _unsupported_model(tmp_path) -> str:
    nodes = [
        *_stem(),
        helper.make_node("Shrink", ["c"], ["s"], lambd=0.1),
        helper.make_node("Mish", ["s"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    return _save(tmp_path, nodes, [_weight("w", 8, 3, 3, 3), _weight("fc", 10, 8)], opset=20)


def test_unsupported_ops_are_named_with_their_versions(tmp_path):
    """Ops without a converter are named with their own version (Mish-18 in an opset-20 graph)."""
    with pytest.raises(UnsupportedModelError) as caught:
        import_model(load_model(_unsupported_model(tmp_path)))
    line = str(caught.value)
    assert "\n" not in line and "ONNX opset 20" in line
    assert "no converter for Mish-18, Shrink-9" in line and "prune still work" in line


def test_compress_stops_before_training_while_prune_works(tmp_path):
    """compress fails with that line and writes nothing; the ONNX-only commands still run."""
    path = _unsupported_model(tmp_path)
    args = ["compress", path, "--rate", "0.3", "--data", "cifar10", "--eval-limit", "20",
            "--data-root", str(cifar10_root()), "-o", str(tmp_path / "o.onnx"),
            "--workers", "0", "--workdir", str(tmp_path / "work")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == UnsupportedModelError.exit_code
    assert "Mish-18" in result.output and "Shrink-9" in result.output
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "work").exists()
    assert sfp_onnx.analyze(path).groups
    report = sfp_onnx.prune(path, tmp_path / "pruned.onnx", rate=0.5, round_to=None)
    assert report.verification.exact


@pytest.mark.parametrize(
    ("model", "variant"),
    [
        ("shufflenet_v2_x0_5", "kept13"),  # Reshape targets computed from Shape at run time
        pytest.param("resnet18", "dynamo", marks=pytest.mark.slow),
    ],
)
def test_dynamic_batch_exports(model, variant, tmp_path):
    """Exports with a dynamic batch axis import exactly at batch 4 and stay dynamic."""
    from tests.exports import export, torchvision_model

    path = export(torchvision_model(model), tmp_path / "m.onnx", variant, size=32)
    imported = import_model(load_model(path))
    images = cifar_images(count=4, size=32)
    reference = create_session(path, provider="cpu").run(None, {"input": images})[0]
    for batch in (images, images[:3]):
        with torch.no_grad():
            ours = imported.module.eval()(torch.from_numpy(batch)).numpy()
        scale = np.abs(reference).max()
        assert np.abs(ours - reference[: len(batch)]).max() <= 1e-5 * scale
