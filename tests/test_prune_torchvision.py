"""`prune --rate 0.3` on real torchvision classifiers, as each exporter writes them.

Graph cases: residual Adds (ResNet), Concat segments (DenseNet, GoogLeNet), depthwise convs
and inverted residuals (MobileNet), SE blocks with Sigmoid/HardSigmoid gates and SiLU
(EfficientNet, MobileNetV3), Flatten into hidden Gemm layers (VGG); each with BN kept or
folded, opset 13 or 17, and the dynamo exporter. Every case ends with the exactness check:
the slim model reproduces the masked one on real CIFAR-10 images in onnxruntime.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import sfp_onnx
from sfp_onnx.graph.measure import measure_model
from sfp_onnx.runtime.session import create_session
from tests.exports import TORCHVISION_MODELS, VARIANTS, cifar_images, export, torchvision_model

MIN_MACS_CUT = {"resnet18": 0.45, "resnet50": 0.45, "vgg11_bn": 0.45}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Cache of exports: (model name, variant) -> path."""
    cache: dict[tuple[str, str], object] = {}
    root = tmp_path_factory.mktemp("torchvision")

    def get(name: str, variant: str):
        if (name, variant) not in cache:
            cache[(name, variant)] = export(
                torchvision_model(name), root / f"{name}_{variant}.onnx", variant
            )
        return cache[(name, variant)]

    return get


def _interface(path) -> list:
    graph = onnx.load(str(path)).graph
    return [(v.name, v.type.SerializeToString()) for v in [*graph.input, *graph.output]]


def _opsets(path) -> dict[str, int]:
    return {o.domain or "ai.onnx": o.version for o in onnx.load(str(path)).opset_import}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_prune_is_exact_on_real_images(exported, tmp_path, name, variant):
    source = exported(name, variant)
    before = source.read_bytes()
    out, masked, report = tmp_path / "slim.onnx", tmp_path / "masked.onnx", tmp_path / "r.json"

    result = sfp_onnx.prune(source, out, rate=0.3, save_masked=masked, report=report)

    assert source.read_bytes() == before, "the input model must never be modified"
    onnx.checker.check_model(str(out), full_check=True)
    assert _interface(out) == _interface(source)
    assert _opsets(out) == _opsets(source)
    images = cifar_images(count=8, size=64)
    y_masked = create_session(masked, provider="cpu").run(None, {"input": images})[0]
    y_slim = create_session(out, provider="cpu").run(None, {"input": images})[0]
    assert np.abs(y_slim - y_masked).max() <= 1e-4 * np.abs(y_masked).max()
    cut = 1 - measure_model(out).macs / measure_model(source).macs
    assert cut == pytest.approx(result.macs_reduction)
    assert cut >= MIN_MACS_CUT.get(name, 0.30), f"{name}: only {cut:.1%} of MACs removed"
    data = json.loads(report.read_text())
    assert data["macs"]["after"] == measure_model(out).macs
    assert data["verification"]["max_abs_diff"] <= 1e-4 * data["verification"]["max_abs_reference"]
    assert {"input", "output", "macs", "params", "verification", "groups"} <= data.keys()


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_analyze_names_each_blocked_group(exported, name):
    result = sfp_onnx.analyze(exported(name, "kept17"))
    blocked = [g for g in result.groups if not g.prunable]
    assert blocked, "the graph input and the classifier output are always blocked"
    assert all(g.blocked for g in blocked)
    reasons = " ".join(g.blocked for g in blocked)
    assert "graph input 'input'" in reasons and "graph output 'logits'" in reasons
    # the MACs of the layers that shrink at rate 0.3 (MobileNetV3's SE and head: 89%)
    assert result.prunable_macs / result.stats.macs > 0.85


@pytest.mark.parametrize("variant", ["kept17", "dynamo"])
@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_y_400mf"])
def test_grouped_conv_families_are_cut_fully(exported, tmp_path, name, variant):
    """ResNeXt's groups=32 and RegNet's group-width-8 convs lose the same count in every
    convolution group: the whole network is cut, not only its 1x1 convs (30% / 26% before)."""
    out = tmp_path / "slim.onnx"
    result = sfp_onnx.prune(exported(name, variant), out, rate=0.3, round_to=None)
    assert result.verification.exact
    assert result.macs_reduction >= 0.45, f"{name}: only {result.macs_reduction:.1%} removed"
    before, after = (_grouped_convs(path) for path in (exported(name, variant), out))
    assert before and before.keys() == after.keys()
    for node, (group, shape) in after.items():
        assert group == before[node][0], "a grouped conv keeps its group count"
        assert shape[0] % group == 0
        assert shape[1] <= before[node][1][1]
    narrowed = sum(shape[1] < before[node][1][1] for node, (_, shape) in after.items())
    assert narrowed > len(after) / 2, "most grouped convs read fewer channels per group"


def _grouped_convs(path) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Conv node -> (group, weight shape) for every conv with group > 1."""
    graph = onnx.load(str(path)).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    found = {}
    for node in graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1:
            found[node.name] = (group, shapes[node.input[1]])
    return found
