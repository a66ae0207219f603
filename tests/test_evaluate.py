"""Tests of sfp_onnx.runtime.evaluate and ``sfp-onnx eval``: tiny exported CNNs, real CIFAR-10.

The ONNX evaluation (onnxruntime) must count exactly what the torch evaluation of the same
module counts on the same 200 test images, for dynamic and fixed batch sizes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sfp_onnx.cli.main import main
from torch import nn

from sfp_onnx.data.datasets import DataConfig, load_datasets
from sfp_onnx.data.loaders import create_loader
from sfp_onnx.errors import DataError, UnsupportedModelError
from sfp_onnx.runtime.evaluate import (
    Accuracy,
    evaluate_onnx,
    evaluate_torch,
    input_size_of,
    read_signature,
)

SAMPLES = 200


class TinyNet(nn.Module):
    """Two convolutions, global pooling and a linear classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ChannelsLast(nn.Module):
    """Takes NHWC input and permutes it for a TinyNet."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


def export(module: nn.Module, path: Path, shape: tuple[int, ...], dynamic_batch: bool) -> Path:
    """Export with the TorchScript exporter; optionally with a dynamic batch axis."""
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notice
        torch.onnx.export(
            module.eval(),
            (torch.randn(*shape),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return path


def tiny_net(classes: int = 10, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(classes).eval()


@pytest.fixture(scope="session")
def net(cifar10_root: Path) -> TinyNet:
    """A TinyNet trained for a few seconds on 1,000 real images, so its predictions vary."""
    config = DataConfig("cifar10", str(cifar10_root), train_limit=1000, augment=False)
    loader = create_loader(load_datasets(config, (32, 32)).train, 50, True, seed=0, workers=0)
    module = tiny_net().train()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    for _ in range(4):
        for images, labels in loader:
            loss = nn.functional.cross_entropy(module(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return module.eval()


@pytest.fixture(scope="session")
def models(net: TinyNet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same TinyNet exported with a dynamic batch, and with fixed batches 1 and 3."""
    folder = tmp_path_factory.mktemp("evaluate")
    return {
        "dynamic": export(net, folder / "dynamic.onnx", (2, 3, 32, 32), True),
        "batch1": export(net, folder / "batch1.onnx", (1, 3, 32, 32), False),
        "batch3": export(net, folder / "batch3.onnx", (3, 3, 32, 32), False),
    }


@pytest.fixture(scope="session")
def cifar_test(cifar10_root: Path):
    """200 real CIFAR-10 test images, 20 per class, normalised, 32x32."""
    config = DataConfig("cifar10", str(cifar10_root), eval_limit=SAMPLES, augment=False)
    return load_datasets(config, (32, 32), with_train=False).test


def test_onnx_accuracy_equals_torch_accuracy(net, models, cifar_test) -> None:
    """onnxruntime and torch count the same correct predictions; both match argmax/topk."""
    loader = create_loader(cifar_test, 50, shuffle=False, seed=0, workers=0)
    images, labels = (torch.cat(t) for t in zip(*loader, strict=True))
    with torch.no_grad():
        logits = net(images)
    assert len(set(logits.argmax(1).tolist())) >= 5  # the net really tells images apart
    top1 = int((logits.argmax(1) == labels).sum())
    top5 = int((logits.topk(5).indices == labels[:, None]).any(1).sum())

    from_onnx = evaluate_onnx(
        models["dynamic"], cifar_test, batch_size=64, provider="cpu", workers=0
    )
    from_torch = evaluate_torch(net, loader, "cpu")
    assert from_onnx.samples == from_torch.samples == SAMPLES
    assert round(from_onnx.top1 * SAMPLES) == round(from_torch.top1 * SAMPLES) == top1
    assert round(from_onnx.top5 * SAMPLES) == round(from_torch.top5 * SAMPLES) == top5
    assert 0 < from_onnx.top1 < from_onnx.top5 < 1


@pytest.mark.parametrize("variant", ["batch1", "batch3"])
def test_fixed_batch_models_give_the_same_accuracy(models, cifar_test, variant: str) -> None:
    """Batch 1 runs image by image; batch 3 pads the last of 67 runs (200 = 66 * 3 + 2)."""
    seen: list[tuple[int, int]] = []
    fixed = evaluate_onnx(
        models[variant],
        cifar_test,
        batch_size=64,
        provider="cpu",
        workers=0,
        progress=lambda done, total: seen.append((done, total)),
    )
    dynamic = evaluate_onnx(models["dynamic"], cifar_test, batch_size=64, provider="cpu", workers=0)
    assert fixed == dynamic
    assert seen == [(64, 200), (128, 200), (192, 200), (200, 200)]


def test_evaluate_torch_restores_training_mode(cifar_test) -> None:
    module = tiny_net().train()
    loader = create_loader(cifar_test, 100, shuffle=False, seed=0, workers=0)
    accuracy = evaluate_torch(module, loader, "cpu", num_classes=10)
    assert module.training and accuracy.samples == SAMPLES


def test_fewer_than_five_classes_use_top_k_of_all(cifar10_root: Path, tmp_path: Path) -> None:
    """A 3-class model on a 3-class image folder: top-5 is top-3, so every image counts."""
    for split, count in (("train", 1), ("test", 10)):
        for name in ("cat", "dog", "ship"):
            (tmp_path / split / name).mkdir(parents=True)
            for k in range(count):
                source = cifar10_root / split / name / f"{k:04d}.png"
                (tmp_path / split / name / f"{k:04d}.png").symlink_to(source)
    data = load_datasets(DataConfig("imagefolder", str(tmp_path)), (32, 32), with_train=False)
    model = export(tiny_net(3), tmp_path / "three.onnx", (2, 3, 32, 32), True)
    accuracy = evaluate_onnx(model, data.test, batch_size=8, provider="cpu", workers=0)
    assert accuracy.samples == 30 and accuracy.top5 == 1.0 and accuracy.top1 < 1.0


def test_class_count_mismatch_is_a_data_error(cifar_test, tmp_path: Path) -> None:
    model = export(tiny_net(7), tmp_path / "seven.onnx", (2, 3, 32, 32), True)
    with pytest.raises(DataError, match="model has 7 outputs but the dataset has 10 classes"):
        evaluate_onnx(model, cifar_test, provider="cpu", workers=0, num_classes=10)


def test_read_signature_of_exported_models(models) -> None:
    dynamic = read_signature(models["dynamic"])
    assert (dynamic.input_name, dynamic.batch, dynamic.num_classes) == ("input", None, 10)
    assert input_size_of(models["dynamic"]) == (3, 32, 32)
    assert read_signature(models["batch1"]).batch == 1


def test_non_image_inputs_are_refused(tmp_path: Path) -> None:
    linear = export(nn.Linear(10, 4), tmp_path / "linear.onnx", (2, 10), True)
    with pytest.raises(UnsupportedModelError, match=r"shape \[\?, 10\]; .* 4-D NCHW image input"):
        input_size_of(linear)
    nhwc = export(ChannelsLast(), tmp_path / "nhwc.onnx", (1, 32, 32, 3), False)
    with pytest.raises(UnsupportedModelError, match="channels last"):
        input_size_of(nhwc)


def test_accuracy_from_counts() -> None:
    assert Accuracy.from_counts(3, 9, 10) == Accuracy(top1=0.3, top5=0.9, samples=10)
    with pytest.raises(DataError, match="no samples"):
        Accuracy.from_counts(0, 0, 0)


# --- CLI -------------------------------------------------------------------------------------


def test_cli_eval_prints_accuracy_and_writes_json(models, cifar10_root: Path, tmp_path: Path):
    out = tmp_path / "eval.json"
    args = ["eval", str(models["dynamic"]), "--data", "cifar10", "--data-root", str(cifar10_root)]
    args += ["--limit", "100", "--provider", "cpu", "--workers", "0", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    config = DataConfig("cifar10", str(cifar10_root), eval_limit=100)
    expected = evaluate_onnx(
        models["dynamic"],
        load_datasets(config, (32, 32), with_train=False).test,
        provider="cpu",
        workers=0,
    )
    assert (written["samples"], written["top1"], written["top5"]) == (
        100,
        expected.top1,
        expected.top5,
    )
    assert "Top-1" in result.stdout and f"{expected.top1:.2%}" in result.stdout


def test_cli_eval_class_mismatch_is_one_error_line(cifar10_root: Path, tmp_path: Path) -> None:
    model = export(tiny_net(7), tmp_path / "seven.onnx", (2, 3, 32, 32), True)
    args = ["eval", str(model), "--data", "cifar10", "--data-root", str(cifar10_root)]
    result = CliRunner().invoke(main, [*args, "--limit", "20", "--workers", "0"])
    assert result.exit_code == DataError.exit_code
    assert result.stderr.strip().splitlines() == [
        "error: model has 7 outputs but the dataset has 10 classes; "
        "use a model trained for this dataset"
    ]
    assert "Traceback" not in result.output
