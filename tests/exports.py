"""Real models for the tests: torchvision classifiers and small CNNs, exported to ONNX.

Every export is a real ``torch.onnx.export`` (legacy TorchScript exporter with BN folded or
kept, opset 13 or 17, or the dynamo exporter). Batch-norm statistics and affine parameters
are randomised so that folding matters and outputs are far from trivial.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

VARIANTS = ("kept17", "fold17", "kept13", "fold13", "dynamo")
TORCHVISION_MODELS = (
    "resnet18",
    "resnet50",
    "vgg11_bn",
    "mobilenet_v2",
    "densenet121",
    "googlenet",
    "efficientnet_b0",
    "mobilenet_v3_small",
)


def randomize_norms(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.2, 0.2, generator=gen)
                mod.running_var.uniform_(0.5, 1.5, generator=gen)
                mod.weight.uniform_(0.5, 1.5, generator=gen)
                mod.bias.uniform_(-0.2, 0.2, generator=gen)
    return module.eval()


def torchvision_model(name: str, num_classes: int = 10) -> nn.Module:
    """A torchvision classifier sized for 64 px inputs.

    VGG's classifier expects a 7x7 map (224 px); at 64 px the map is 2x2, so its
    AdaptiveAvgPool is dropped and the three-layer classifier is narrowed (512 hidden units),
    keeping its structure: hidden Gemm layers that are themselves pruned.
    """
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(num_classes=num_classes, **kwargs)
    if name.startswith("vgg"):
        model.avgpool = nn.Identity()
        model.classifier = nn.Sequential(
            nn.Linear(512 * 2 * 2, 512), nn.ReLU(), nn.Dropout(),
            nn.Linear(512, 512), nn.ReLU(), nn.Dropout(),
            nn.Linear(512, num_classes),
        )  # fmt: skip
    return randomize_norms(model)


def export(module: nn.Module, path: Path, variant: str = "kept17", size: int = 64) -> Path:
    """Export ``module`` with input ``input`` [batch, 3, size, size] and output ``logits``."""
    module = module.eval()
    example = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant.startswith("dynamo"):  # "dynamo": the default opset; "dynamo23": opset 23
            opset = {"opset_version": int(variant[6:])} if variant != "dynamo" else {}
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, verbose=False,
                input_names=["input"], output_names=["logits"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, **opset,
            )  # fmt: skip
        else:
            torch.onnx.export(
                module, example, str(path), dynamo=False,
                opset_version=int(variant[-2:]),
                do_constant_folding=variant.startswith("fold"),
                training=torch.onnx.TrainingMode.EVAL,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
    return path


class ResidualNet(nn.Module):
    """A small ResNet-like CNN: stem, two residual blocks per stage, a projection shortcut."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block1 = _Block(width, width)
        self.block2 = _Block(width, width)
        self.down = _Block(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.block2(self.block1(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DepthwiseMultiplierNet(nn.Module):
    """Stem, a depthwise conv with channel multiplier 2 (groups = C_in, C_out = 2·C_in), a
    pointwise conv, BN + ReLU after each, GAP, a linear head: MobileNet-style channel growth."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()

        def unit(cin: int, cout: int, kernel: int, groups: int = 1) -> list[nn.Module]:
            conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups)
            return [conv, nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *unit(3, width, 3), *unit(width, 2 * width, 3, groups=width),
            *unit(2 * width, 12, 1),
        )  # fmt: skip
        self.head = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.body(x), 1)
        return self.head(torch.flatten(x, 1))


class GroupedNet(nn.Module):
    """ResNeXt-style: a bottleneck whose 3x3 conv has 4 groups (1x1 convs around it, a
    residual join), then a grouped conv of 2 groups that widens 16 → 24, GAP, a linear head."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()

        def unit(cin: int, cout: int, kernel: int, groups: int = 1) -> nn.Sequential:
            conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = unit(3, width, 3)
        self.reduce = unit(width, width, 1)
        self.grouped = unit(width, width, 3, groups=4)
        self.expand = nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))
        self.widen = unit(width, width * 3 // 2, 3, groups=2)
        self.head = nn.Linear(width * 3 // 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.expand(self.grouped(self.reduce(x))))
        x = nn.functional.adaptive_avg_pool2d(self.widen(x), 1)
        return self.head(torch.flatten(x, 1))


class ChannelSplitNet(nn.Module):
    """One conv's output cut along the channels, three ways (``kind``):

    - ``glu``: ``a, b = chunk(y, 2)``, ``a * sigmoid(b)`` (a gated linear unit: the halves
      are joined channel by channel);
    - ``branches``: ``split(y, [6, 10])``, a conv on each piece, concatenated again;
    - ``slice``: ``y[:, 4:12]`` read by the next conv, ``y`` itself by a second one.
    """

    def __init__(self, kind: str, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.kind = kind
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width))
        half = width // 2
        if kind == "glu":
            self.body = nn.Conv2d(half, 12, 3, padding=1)
        elif kind == "branches":
            self.left = nn.Conv2d(6, 8, 3, padding=1)
            self.right = nn.Conv2d(width - 6, 8, 1)
            self.body = nn.Conv2d(16, 12, 3, padding=1)
        else:
            self.body = nn.Conv2d(8, 12, 3, padding=1)
            self.side = nn.Conv2d(width, 12, 1)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x)) if self.kind != "glu" else self.stem(x)
        if self.kind == "glu":
            a, b = torch.chunk(y, 2, dim=1)
            y = self.body(a * torch.sigmoid(b))
        elif self.kind == "branches":
            left, right = torch.split(y, [6, y.shape[1] - 6], dim=1)
            y = self.body(
                torch.cat([torch.relu(self.left(left)), torch.relu(self.right(right))], 1)
            )
        else:
            y = self.body(y[:, 4:12]) + self.side(y)
        y = nn.functional.adaptive_avg_pool2d(torch.relu(y), 1)
        return self.head(torch.flatten(y, 1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.shortcut(x))


def cifar10_root() -> Path:
    """The local CIFAR-10 ImageFolder tree (``$SFP_ONNX_CIFAR10`` or ../shared/data/cifar10)."""
    import os

    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
    return Path(os.environ.get("SFP_ONNX_CIFAR10", default))


def cifar_images(count: int = 16, size: int = 32) -> np.ndarray:  # noqa: F821
    """``count`` real CIFAR-10 test images (classes in turn), normalised NCHW float32."""
    import numpy as np
    from PIL import Image

    root = cifar10_root() / "test"
    if not root.is_dir():
        import pytest

        pytest.skip(f"real CIFAR-10 not found at {root.parent} (set SFP_ONNX_CIFAR10)")
    classes = sorted(p.name for p in root.iterdir())
    images = []
    for k in range(count):
        path = root / classes[k % len(classes)] / f"{k // len(classes):04d}.png"
        image = Image.open(path).convert("RGB")
        if size != 32:
            image = image.resize((size, size), Image.BILINEAR)
        images.append(np.asarray(image, dtype=np.float32) / 255.0)
    batch = np.stack(images).transpose(0, 3, 1, 2)
    mean = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)[:, None, None]
    std = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)[:, None, None]
    return ((batch - mean) / std).astype(np.float32)


class GroupNormNet(nn.Module):
    """conv → GroupNorm(4 groups of 4) → ReLU, a residual block normed the same way, GAP,
    a linear head: the small-batch / detection-backbone style."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()

        def unit(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout)]

        self.stem = nn.Sequential(*unit(3, width), nn.ReLU())
        self.body = nn.Sequential(*unit(width, width), nn.ReLU(), *unit(width, width))
        self.head = nn.Linear(width, num_classes)
        with torch.no_grad():  # not the identity init, so pruning a group changes something
            for norm in self.modules():
                if isinstance(norm, nn.GroupNorm):
                    norm.weight.uniform_(0.5, 1.5)
                    norm.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
