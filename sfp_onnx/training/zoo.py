"""Reference models: the CIFAR ResNets of He et al. 2016, a CIFAR VGG, and their ONNX export.

This module owns the PyTorch definitions the examples, tests and benchmarks train and prune —
the CIFAR ResNet family (depth 6n+2: 20, 32, 56, 110) and a small VGG with BatchNorm and a
two-layer classifier (a family without residual joins) — and the one function that turns such
a module into an ONNX file. It imports nothing beyond torch and the package's light
helpers, so a bare training machine (torch, numpy, pillow) can use it. Training loops live in
``examples/``; loading, analysis and pruning of the exported ONNX belong to the other stages.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from sfp_onnx._io import atomic_path
from sfp_onnx.errors import UsageError

__all__ = [
    "VGG_STAGES",
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "create_cifar_resnet",
    "create_cifar_vgg",
    "export_onnx",
]

# Conv widths of the CIFAR VGG, a 2x2 max pool after each stage: 32 -> 16 -> 8 -> 4 -> 2 px.
VGG_STAGES = ((32,), (64,), (128, 128), (256, 256))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection, ReLU after the Add.

    When the block changes resolution or width, the shortcut is a 1x1 strided conv + BN
    (projection, "option B" of He et al.), so both inputs of the Add come out of a conv + BN.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem conv, three stages of BasicBlocks at widths (w, 2w, 4w), global pool, Linear.

    Stages 2 and 3 halve the resolution in their first block. For a 32x32 input the feature
    maps are 32x32, 16x16 and 8x8.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = _make_stage(width, width, blocks_per_stage, stride=1)
        self.layer2 = _make_stage(width, 2 * width, blocks_per_stage, stride=2)
        self.layer3 = _make_stage(2 * width, 4 * width, blocks_per_stage, stride=2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """Stages of 3x3 conv + BN + ReLU with a max pool after each, then Linear-ReLU-Linear.

    The classifier reads the flattened C x 2 x 2 map of the last stage, so pruning that stage
    removes blocks of four input columns of the first Linear, whose own outputs are pruned too.
    """

    def __init__(self, stages: tuple[tuple[int, ...], ...], num_classes: int, hidden: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for widths in stages:
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)]
                layers.append(nn.ReLU(inplace=True))
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(channels * 2 * 2, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs (fan-out, as He et al.), BN at identity, Kaiming Linear, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)


def create_cifar_resnet(depth: int = 20, num_classes: int = 10, width: int = 16) -> nn.Module:
    """Build the CIFAR ResNet of He et al. 2016 ("Deep Residual Learning", section 4.2).

    ResNet-20 has 272,474 parameters and 40.81M multiply-adds at 32x32 (the paper's 40.55M
    plus 0.26M for the two projection shortcuts).

    Args:
        depth: total number of weighted layers, 6n+2 (20, 32, 44, 56, 110, ...).
        num_classes: size of the classifier output.
        width: channels of the first stage; the stages have (width, 2*width, 4*width).

    Raises:
        UsageError: ``depth`` is not 6n+2 with n >= 1, or a size is not positive.
    """
    if depth < 8 or (depth - 2) % 6:
        raise UsageError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110...), got {depth}")
    if num_classes < 1 or width < 1:
        raise UsageError(f"num_classes and width must be positive, got {num_classes}, {width}")
    model = CifarResNet((depth - 2) // 6, num_classes, width)
    _init_weights(model)
    return model


def create_cifar_vgg(num_classes: int = 10, hidden: int = 256) -> nn.Module:
    """Build the CIFAR VGG of :data:`VGG_STAGES` for 32x32 inputs (34.1M multiply-adds)."""
    if num_classes < 1 or hidden < 1:
        raise UsageError(f"num_classes and hidden must be positive, got {num_classes}, {hidden}")
    model = CifarVGG(VGG_STAGES, num_classes, hidden)
    _init_weights(model)
    return model


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: tuple[int, int, int] = (3, 32, 32),
    opset: int = 17,
    dynamic_batch: bool = True,
    fold_bn: bool = False,
) -> None:
    """Export a module in eval mode to ONNX with the TorchScript (legacy) exporter, atomically.

    The graph has one input ``input`` (N, C, H, W) and one output ``logits``; with
    ``dynamic_batch`` the batch axis is symbolic. The module's train/eval mode is restored
    afterwards. The legacy exporter needs the ``onnx`` package at export time.

    The exporter replaces parameters with equal values (e.g. the BN statistics of a freshly
    initialised network) by ``Identity`` nodes on one shared initializer; these are turned
    back into separate initializers, so every Conv/BatchNormalization owns its parameters.

    Args:
        module: the network; it is run once on a zero tensor on its own device.
        path: the ``.onnx`` file to write.
        input_size: (C, H, W) of one example.
        opset: ONNX opset version of the default domain.
        dynamic_batch: make the batch dimension symbolic (``batch``); else fixed at 1.
        fold_bn: fold each BatchNormalization into the Conv before it (constant folding);
            False keeps the BatchNormalization nodes, as sfp-onnx's training expects.
    """
    was_training = module.training
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dummy = torch.zeros((1, *input_size), device=device)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    module.eval()
    try:
        with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(
                module,
                (dummy,),
                str(tmp),
                input_names=["input"],
                output_names=["logits"],
                opset_version=opset,
                dynamic_axes=axes,
                do_constant_folding=fold_bn,
                training=torch.onnx.TrainingMode.EVAL,
                dynamo=False,
            )
            _undo_initializer_dedup(tmp)
    finally:
        module.train(was_training)


def _undo_initializer_dedup(path: os.PathLike) -> None:
    """Replace each ``Identity(initializer)`` node by a copy of that initializer, in place."""
    import onnx  # the legacy exporter already needs it; keep it out of the import of zoo

    model = onnx.load(os.fspath(path))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    outputs = {out.name for out in graph.output}
    shared = [
        n
        for n in graph.node
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs
    ]
    if not shared:
        return
    for node in shared:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)
    onnx.save(model, os.fspath(path))
