"""Tests for sfp_onnx.training.zoo: the CIFAR ResNet definition and its ONNX export.

Graph cases: ResNet-20/32/56/110 at 32x32 (sizes and multiply-adds against He et al. 2016),
and ResNet-20 exported with BatchNormalization kept and folded, run in onnxruntime.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from sfp_onnx.errors import UsageError
from sfp_onnx.runtime.session import create_session
from sfp_onnx.training.zoo import create_cifar_resnet, export_onnx

CIFAR_TEST = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10/exact_subset/test"
MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)

# Paper's multiply-adds (option A shortcuts, no projections), in millions.
PAPER_MACS = {20: 40.55, 32: 68.86, 56: 125.49, 110: 252.89}
# Our two projection shortcuts at width 16: 16->32 at 16x16 and 32->64 at 8x8, 1x1 each.
PROJECTION_MACS = 32 * 16 * 16 * 16 + 64 * 32 * 8 * 8
PROJECTION_PARAMS = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def count_macs(model: nn.Module, size: int = 32) -> int:
    """Multiply-adds of every Conv2d and Linear for one image, counted by forward hooks."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    hooks = [
        m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return total


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_size_and_macs() -> None:
    """ResNet-20: 0.27M parameters and 40.55M + projections multiply-adds, exactly."""
    model = create_cifar_resnet(20)
    assert n_params(model) == 272_474
    assert n_params(model) - PROJECTION_PARAMS == 269_722  # the paper's "0.27M" (option A)
    assert count_macs(model) == 40_813_184
    assert count_macs(model) - PROJECTION_MACS == 40_551_040


@pytest.mark.parametrize("depth", sorted(PAPER_MACS))
def test_macs_match_paper(depth: int) -> None:
    """Every depth reproduces the paper's multiply-adds once the projections are taken out."""
    model = create_cifar_resnet(depth)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth - 1 + 2  # depth-1 convs + Linear = depth layers, + 2 projections
    macs = count_macs(model) - PROJECTION_MACS
    assert abs(macs / 1e6 - PAPER_MACS[depth]) < 0.005


def test_width_and_classes() -> None:
    """Width scales the three stages; num_classes sizes the classifier."""
    model = create_cifar_resnet(32, num_classes=100, width=8)
    out_widths = sorted({m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)})
    assert out_widths == [8, 16, 32]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("depth", [0, 19, 21, 2])
def test_bad_depth(depth: int) -> None:
    with pytest.raises(UsageError, match="6n\\+2"):
        create_cifar_resnet(depth)


@pytest.fixture(scope="session")
def trained_like() -> nn.Module:
    """ResNet-20 with random BN statistics and affine parameters, so folding BN matters."""
    torch.manual_seed(0)
    model = create_cifar_resnet(20)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.train()


@pytest.fixture(scope="session")
def exported(trained_like: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict:
    paths = {}
    for fold in (False, True):
        folder = tmp_path_factory.mktemp(f"fold{fold}")
        paths[fold] = folder / "r20.onnx"
        export_onnx(trained_like, paths[fold], fold_bn=fold)
    return paths


def cifar_batch(n: int) -> np.ndarray:
    """The first ``n`` lossless CIFAR-10 test images (one per class, cycling), normalised."""
    if not CIFAR_TEST.is_dir():
        pytest.skip(f"CIFAR-10 images not found at {CIFAR_TEST}")
    classes = sorted(p.name for p in CIFAR_TEST.iterdir())
    files = [sorted((CIFAR_TEST / classes[i % 10]).glob("*.png"))[i // 10] for i in range(n)]
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 for f in files])
    return ((x - MEAN) / STD).transpose(0, 3, 1, 2).copy()


def assert_matches_torch(model: nn.Module, path: Path, x: np.ndarray) -> None:
    was_training = model.training
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    model.train(was_training)
    (got,) = create_session(path, provider="cpu", threads=1).run(["logits"], {"input": x})
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("fold", [False, True])
def test_export_graph(exported: dict, trained_like: nn.Module, fold: bool) -> None:
    """BN kept or folded; one input 'input' and one output 'logits' with a symbolic batch."""
    model = onnx.load(exported[fold])
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Conv"] == 21 and ops["Add"] == 9 and ops["Gemm"] == 1
    assert ops["BatchNormalization"] == (0 if fold else 21)
    assert ops["Identity"] == 0  # no initializers shared between layers
    assert model.opset_import[0].version == 17
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"
    assert trained_like.training  # the export restored the mode it found
    assert [p.name for p in exported[fold].parent.iterdir()] == ["r20.onnx"]  # no temp left


@pytest.mark.parametrize("fold", [False, True])
def test_export_matches_torch_random(exported: dict, trained_like: nn.Module, fold: bool) -> None:
    """onnxruntime reproduces torch eval-mode logits to 1e-5 at batch sizes 1 and 5."""
    rng = np.random.default_rng(0)
    for n in (1, 5):
        x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        assert_matches_torch(trained_like, exported[fold], x)


@pytest.mark.parametrize("fold", [False, True])
def test_export_matches_torch_cifar(exported: dict, trained_like: nn.Module, fold: bool) -> None:
    """Same on 20 real CIFAR-10 test images."""
    assert_matches_torch(trained_like, exported[fold], cifar_batch(20))


def test_export_fixed_batch(tmp_path: Path) -> None:
    """dynamic_batch=False fixes the batch at 1; input_size sets the spatial size."""
    path = tmp_path / "fixed.onnx"
    export_onnx(create_cifar_resnet(20), path, dynamic_batch=False, input_size=(3, 40, 40))
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 40, 40]
