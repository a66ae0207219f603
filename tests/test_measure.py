"""Measuring: MACs, parameters and bytes counted on ONNX files as written.

Graph cases: torchvision ResNet-18 at 224 px, with BatchNormalization kept and folded; a
hand-built graph of Conv (2-D, grouped), BatchNormalization, ConvTranspose, Reshape, 1-D
Conv, Gemm and a MatMul whose weight is a Constant node, whose costs are worked out by hand;
a 3-D Conv and batched/broadcast MatMuls; weights listed as graph inputs (IR 3 style); the
same model saved with external data; an input with a symbolic spatial axis; ShuffleNet
exported by both exporters (shapes computed at run time); a conv feeding an LSTM (torch's
export), and an Einsum whose cost is not sized.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper

from sfp_onnx.errors import UnsupportedModelError
from sfp_onnx.graph.measure import count_layer_costs, count_params, measure_model
from sfp_onnx.runtime.session import create_session
from sfp_onnx.training.zoo import export_onnx

# Hand-computed costs of _tiny_model(), layer by layer (MACs for one sample, params).
TINY_LAYERS = [
    ("conv2d", 4 * 8 * 8 * 3 * 3 * 3, 4 * 3 * 3 * 3 + 4),  # 6912, W + bias
    ("grouped", 4 * 4 * 4 * 2 * 3 * 3, 4 * 2 * 3 * 3),  # 1152, group 2, stride 2
    ("deconv", 4 * 4 * 4 * 2 * 2 * 2, 4 * 2 * 2 * 2),  # 512: each input -> C_out * 2x2
    ("conv1d", 3 * 14 * 8 * 3, 3 * 8 * 3),  # 1008
    ("fc", 5 * 42, 5 * 42 + 5),  # 210, transB
    ("matmul", 1 * 6 * 5, 5 * 6),  # 30, weight in a Constant node
]
# All float tensors but the BN running mean and variance (2 x 4) and the int64 shapes.
TINY_PARAMS = sum(p for _, _, p in TINY_LAYERS) + 2 * 4


def _init(name: str, *shape: int) -> onnx.TensorProto:
    rng = np.random.default_rng(len(name))
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _tiny_model() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> BN -> grouped Conv -> ConvTranspose -> Reshape -> Conv1d ->
    Flatten -> Gemm -> Reshape -> MatMul(Constant) -> y[N,1,6]."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv2d", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "t", "mu", "var"], ["bn"], "bn"),
        helper.make_node(
            "Conv", ["bn", "w2"], ["c2"], "grouped", group=2, strides=[2, 2], pads=[1, 1, 1, 1]
        ),
        helper.make_node("ConvTranspose", ["c2", "w3"], ["c3"], "deconv", strides=[2, 2]),
        helper.make_node("Reshape", ["c3", "shape1"], ["r1"], "reshape1"),
        helper.make_node("Conv", ["r1", "w4"], ["c4"], "conv1d"),
        helper.make_node("Flatten", ["c4"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "w5", "b5"], ["g"], "fc", transB=1),
        helper.make_node("Reshape", ["g", "shape2"], ["r2"], "reshape2"),
        helper.make_node("Constant", [], ["w6"], "const", value=_init("w6", 5, 6)),
        helper.make_node("MatMul", ["r2", "w6"], ["y"], "matmul"),
    ]
    inits = [
        *(_init("w1", 4, 3, 3, 3), _init("b1", 4), _init("s", 4), _init("t", 4)),
        *(_init("mu", 4), numpy_helper.from_array(np.ones(4, np.float32), "var")),
        *(_init("w2", 4, 2, 3, 3), _init("w3", 4, 2, 2, 2), _init("w4", 3, 8, 3)),
        *(_init("w5", 5, 42), _init("b5", 5)),
        numpy_helper.from_array(np.array([0, 8, 16], np.int64), "shape1"),
        numpy_helper.from_array(np.array([0, 1, 5], np.int64), "shape2"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _costs_table(model: onnx.ModelProto, batch_size: int = 1) -> list[tuple[str, int, int]]:
    return [(c.name, c.macs, c.params) for c in count_layer_costs(model, batch_size)]


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """torchvision ResNet-18 (random weights) at 224 px: BN kept, and BN folded into the convs."""
    torch.manual_seed(0)
    module = torchvision.models.resnet18()
    folder = tmp_path_factory.mktemp("resnet18")
    export_onnx(module, folder / "kept.onnx", input_size=(3, 224, 224))
    export_onnx(module, folder / "folded.onnx", input_size=(3, 224, 224), fold_bn=True)
    return module, folder / "kept.onnx", folder / "folded.onnx"


def test_resnet18_matches_published_macs_and_torch_params(resnet18_files):
    """ResNet-18: 1.814 GMACs at 224 px and PyTorch's 11,689,512 parameters (BN kept)."""
    module, kept, _ = resnet18_files
    stats = measure_model(kept)
    assert stats.macs == pytest.approx(1.814e9, rel=0.005)
    assert stats.params == 11_689_512 == sum(p.numel() for p in module.parameters())
    assert stats.file_bytes == kept.stat().st_size
    costs = count_layer_costs(onnx.load(str(kept)))
    assert [c.op_type for c in costs] == ["Conv"] * 20 + ["Gemm"]
    assert costs[0].output_shape == (1, 64, 112, 112) and costs[-1].output_shape == (1, 1000)


def test_resnet18_folded_counts_conv_biases_instead_of_bn(resnet18_files):
    """Folding BN keeps the MACs and turns 2 parameters per BN channel into 1 conv bias."""
    module, kept, folded = resnet18_files
    bn_channels = sum(
        m.num_features for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )
    stats = measure_model(folded)
    assert stats.macs == measure_model(kept).macs
    assert stats.params == 11_689_512 - bn_channels


def test_tiny_model_costs_by_hand():
    """Each layer's MACs and params equal the hand-worked numbers; BN stats are not params."""
    model = _tiny_model()
    assert _costs_table(model) == TINY_LAYERS
    assert count_params(model) == TINY_PARAMS
    out = create_session(model.SerializeToString(), provider="cpu").run(
        None, {"x": np.zeros((2, 3, 8, 8), np.float32)}
    )[0]
    assert out.shape == (2, 1, 6)


def test_batch_size_changes_shapes_not_macs():
    """At batch 3 the output shapes carry 3 and the MACs stay per sample."""
    model = _tiny_model()
    costs = count_layer_costs(model, batch_size=3)
    assert _costs_table(model, 3) == TINY_LAYERS
    assert [c.output_shape for c in costs] == [
        (3, 4, 8, 8),
        (3, 4, 4, 4),
        (3, 2, 8, 8),
        (3, 3, 14),
        (3, 5),
        (3, 1, 6),
    ]


def test_weights_listed_as_graph_inputs():
    """IR-3 style: initializers also listed as graph inputs are weights, not data inputs."""
    model = _tiny_model()
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in model.graph.initializer
    )
    assert _costs_table(model) == TINY_LAYERS
    assert count_params(model) == TINY_PARAMS


def test_conv3d_and_batched_matmuls():
    """3-D Conv; MatMul broadcasting a weight [1,4,5] over [N,2,3,4]; activation x activation."""
    nodes = [
        helper.make_node("Conv", ["v", "k"], ["c"], "conv3d"),
        helper.make_node("MatMul", ["a", "m"], ["am"], "broadcast"),
        helper.make_node("Transpose", ["a"], ["at"], "t", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["a", "at"], ["aa"], "attention"),
    ]
    graph = helper.make_graph(
        nodes,
        "batched",
        [
            helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 2, 4, 6, 6]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2, 3, 4]),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c", "am", "aa")],
        [_init("k", 3, 2, 3, 3, 3), _init("m", 1, 4, 5)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    assert _costs_table(model, batch_size=2) == [
        ("conv3d", 3 * 2 * 4 * 4 * 2 * 27, 3 * 2 * 27),  # out (3,2,4,4) x C_in*k^3
        ("broadcast", 2 * 3 * 5 * 4, 20),
        ("attention", 2 * 3 * 3 * 4, 0),
    ]


def test_external_data(tmp_path):
    """A model saved with its weights (and shape tensors) in a separate file is counted alike."""
    path = tmp_path / "tiny.onnx"
    onnx.save_model(
        _tiny_model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="tiny.onnx.data",
        size_threshold=0,
    )
    data = tmp_path / "tiny.onnx.data"
    assert data.stat().st_size > path.stat().st_size
    stats = measure_model(path)
    assert stats.macs == sum(m for _, m, _ in TINY_LAYERS)
    assert stats.params == TINY_PARAMS
    assert stats.file_bytes == path.stat().st_size + data.stat().st_size
    assert _costs_table(onnx.load(str(path))) == TINY_LAYERS


def test_symbolic_spatial_axis_is_refused():
    """An input whose height is symbolic cannot be counted: one line naming the axis."""
    model = _tiny_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(UnsupportedModelError, match=r"'x' has a symbolic dimension 'H' at axis 2"):
        count_layer_costs(model)


@pytest.mark.parametrize("variant", ["kept13", "fold17"])
def test_shapes_computed_at_run_time_are_folded(tmp_path, variant):
    """ShuffleNet's legacy export slices channels at Shape(x)[1] / 2: counted like dynamo's.

    The dynamo export writes those bounds as constants, the legacy exporter computes them
    (and, without constant folding, every reshape target) at run time.
    """
    from tests.import_matrix import export_default

    legacy = measure_model(export_default("shufflenet_v2_x0_5", variant, tmp_path))
    dynamo = measure_model(export_default("shufflenet_v2_x0_5", "dynamo", tmp_path))
    assert legacy.macs == dynamo.macs > 0


class _ConvLstm(torch.nn.Module):
    """A conv whose 4x4 output positions are the 16 steps of an LSTM (8 -> 12), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.lstm = torch.nn.LSTM(8, 12)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.conv(x).flatten(2).permute(2, 0, 1)  # [16, N, 8]
        out, _ = self.lstm(steps)
        return self.head(out[-1])


def test_lstm_compute_is_counted(tmp_path):
    """LSTM MACs per step: 4 gates x H x (input + H); the analysis' total holds them."""
    import sfp_onnx

    path = tmp_path / "conv_lstm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_ConvLstm().eval(), (torch.randn(1, 3, 4, 4),), str(path), dynamo=False)
    costs = {c.op_type: c.macs for c in count_layer_costs(onnx.load(str(path)))}
    assert costs["LSTM"] == 16 * 4 * 12 * (8 + 12)
    assert costs["Conv"] == 16 * 8 * 3 * 9
    analysis = sfp_onnx.analyze(path)
    assert analysis.stats.macs == sum(costs.values()) and analysis.uncounted == {}


def test_ops_whose_cost_is_not_counted_are_named(tmp_path):
    """An Einsum's multiply-adds are not sized: analyze says so instead of a silent total."""
    import sfp_onnx

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    weight = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Einsum", ["c", "c"], ["y"], equation="nchw,nchw->nc"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "einsum.onnx"
    onnx.save(model, str(path))
    assert sfp_onnx.analyze(path).uncounted == {"Einsum": 1}
