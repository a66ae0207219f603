"""Import coverage: torchvision classifiers from both exporters import exactly and train.

Graph case: 18 torchvision classifiers (random weights, randomised BatchNorm statistics,
10 classes, 32 px inputs; VGG 64 px) exported with each exporter's defaults, a fixed batch
of 1: the legacy TorchScript exporter at opset 13 and 17 with BatchNorm kept or folded into
the convs, and the dynamo exporter (opset 20). Every model is tested with the dynamo
exporter and one legacy variant (all four for ResNet-18 and MobileNetV3-small); the whole
18 × 5 matrix is benchmarks/import_coverage.py's (results/import_coverage.md). Each cell
must import, give onnxruntime's output within 1e-5·max|y| on real CIFAR-10 images at batch 4
(the fixed batch made dynamic), train every Conv weight in one SGD step, keep every weight a
parameter and link every weight the pruning groups need. For a few cells ``compress --epochs
1 --train-limit 256`` runs end to end and writes an exact slim model with the user's
interface. The slow half (large models, most dynamo exports) is marked ``slow``.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner
from sfp_onnx.cli.main import main

from tests.import_matrix import (
    MODELS,
    TOLERANCE,
    VARIANTS,
    check_cell,
    export_default,
    input_size,
    is_fast,
)

torch.set_num_threads(1)


# Every legacy variant for these; the other models take one legacy variant each, in turn.
ALL_VARIANTS = ("resnet18", "mobilenet_v3_small")


def _cells():
    """Every model with the dynamo exporter and at least one legacy variant, every variant on
    several models: a covering subset of the full matrix, which benchmarks/import_coverage.py
    runs cell by cell (results/import_coverage.md)."""
    legacy = [v for v in VARIANTS if v != "dynamo"]
    for index, model in enumerate(MODELS):
        variants = legacy if model in ALL_VARIANTS else [legacy[index % len(legacy)]]
        for variant in [*variants, "dynamo"]:
            marks = () if is_fast(model, variant) else (pytest.mark.slow,)
            yield pytest.param(model, variant, marks=marks, id=f"{model}-{variant}")


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("import_coverage")


@pytest.mark.parametrize(("model", "variant"), list(_cells()))
def test_imports_exactly_and_trains(model, variant, export_dir, cifar10_root):
    path = export_default(model, variant, export_dir)
    result = check_cell(path, input_size(model))
    assert result.error is None, f"{result.stage}: {result.error}"
    assert result.rel_diff <= TOLERANCE
    assert result.convs_trained == result.convs > 0
    assert not result.frozen, f"weights left as frozen buffers: {result.frozen[:3]}"
    assert not result.unlinked, f"pruned weights without a torch tensor: {result.unlinked[:3]}"


@pytest.mark.parametrize(
    ("model", "variant"),
    [
        ("resnet18", "dynamo18"),  # the default of torch 2.9
        ("shufflenet_v2_x0_5", "dynamo23"),  # the newest opset torch exports (Split, Reshape-23)
        pytest.param("convnext_tiny", "dynamo23", marks=pytest.mark.slow),
    ],
)
def test_other_dynamo_opsets(model, variant, export_dir, cifar10_root):
    """The dynamo exporter at opsets 18 and 23 (versions of Conv, Reshape... of opsets 21-23)."""
    result = check_cell(export_default(model, variant, export_dir), input_size(model))
    assert result.exact, f"{result.stage}: {result.error}"


COMPRESS_CELLS = [
    pytest.param("resnet18", "fold17", id="resnet18-fold17"),
    pytest.param("mobilenet_v3_small", "kept13", id="mobilenet_v3_small-kept13"),
    pytest.param("resnet18", "dynamo", id="resnet18-dynamo"),
    pytest.param("efficientnet_b0", "dynamo", id="efficientnet_b0-dynamo", marks=pytest.mark.slow),
    pytest.param("convnext_tiny", "dynamo", id="convnext_tiny-dynamo", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("model", "variant"), COMPRESS_CELLS)
def test_compress_completes_exactly(model, variant, export_dir, cifar10_root, tmp_path):
    """A fixed-batch export trains at batch 64 and its slim model keeps the fixed interface."""
    source = export_default(model, variant, export_dir)
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    args = [
        "compress", str(source), "-o", str(out), "--rate", "0.3", "--data", "cifar10",
        "--data-root", str(cifar10_root), "--epochs", "1", "--train-limit", "256",
        "--eval-limit", "64", "--batch-size", "64", "--workers", "0", "--device", "cpu",
        "--no-bench", "--report", str(report), "--workdir", str(tmp_path / "work"),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["verification"]["exact"] and data["verification"]["inputs"].startswith("real")
    assert data["macs"]["after"] < data["macs"]["before"]
    src, dst = onnx.load(str(source)).graph, onnx.load(str(out)).graph
    assert [(v.name, v.type) for v in src.input] == [(v.name, v.type) for v in dst.input]
    assert [(v.name, v.type) for v in src.output] == [(v.name, v.type) for v in dst.output]
    assert src.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # still a fixed batch
