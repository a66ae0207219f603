"""BatchNorm during fine-tuning: re-estimating statistics, and norms put back into folded exports.

This module owns two things.

:func:`recalibrate_batchnorm` (and the :class:`BatchNormRecalibration` training hook) re-estimate
every BatchNorm's running statistics on a few training batches: after a mask change the
statistics left from before make the eval-mode network wrong until many steps have passed.

:class:`InsertedNorms` trains a BN-folded export as what it was. torch.onnx's legacy exporter
folds every Conv+BatchNorm by default, so most users' files have no norm left; fine-tuning them
trains an unnormalised network, which diverges at a fine-tuning learning rate. A BatchNorm is
attached after each convolution whose output no norm reads, initialised so the function is
unchanged (running statistics measured on training batches, scale and shift set to undo
them), trained with the rest, and folded back into the convolution's weight and bias before
the weights are written — exactly, to float32 round-off. The ONNX graph never sees it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from torch.utils.data import Dataset

from sfp_onnx.data.loaders import create_loader
from sfp_onnx.training.hooks import TrainingHook
from sfp_onnx.training.import_torch import ImportedModel

__all__ = ["BatchNormRecalibration", "InsertedNorms", "recalibrate_batchnorm"]

_NORM_OPS = frozenset(
    {"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"}
)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_FOR = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


@torch.no_grad()
def recalibrate_batchnorm(
    module: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], limit: int
) -> int:
    """Re-estimate every BatchNorm's running statistics on up to ``limit`` batches.

    Training itself is not affected (train-mode BatchNorm uses batch statistics); only
    evaluation and the written model are. A channel that is exactly zero keeps a running
    mean of exactly zero.

    Returns:
        The number of batches used (0 when the module has no BatchNorm).
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or limit < 1:
        return 0
    device = next(module.parameters()).device
    was_training = module.training
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    module.train()
    used = 0
    try:
        for images, _ in batches:
            module(images.to(device))
            used += 1
            if used >= limit:
                break
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        module.train(was_training)
    return used


class BatchNormRecalibration(TrainingHook):
    """Training hook: re-estimate BatchNorm statistics at every epoch end (after the masks)."""

    name = "bn_recalibration"
    label = "re-estimating BatchNorm statistics"

    def __init__(
        self, module: nn.Module, train_set: Dataset, batch_size: int, seed: int, batches: int,
        workers: int = 0,
    ) -> None:  # fmt: skip
        self.module = module
        self.train_set = train_set
        self.batch_size = batch_size
        self.seed = seed
        self.batches = batches
        self.workers = workers

    def epoch_end(self, epoch: int) -> dict:
        loader = create_loader(
            self.train_set, self.batch_size, shuffle=True, seed=self.seed * 7919 + epoch,
            workers=self.workers,
        )  # fmt: skip
        used = recalibrate_batchnorm(self.module, loader, self.batches)
        return {"bn_recalibration_batches": used}


class _Attached:
    """A BatchNorm applied to a convolution's output by a forward hook."""

    def __init__(self, conv: nn.Module, weight: str) -> None:
        self.conv = conv
        self.weight = weight  # the ONNX initializer of the conv's weight
        conv.add_module("inserted_norm", _NORM_FOR[type(conv)](conv.out_channels))
        self.norm = conv.inserted_norm
        self.sums: list[torch.Tensor] | None = None  # while calibrating: count, sum, sum²
        self.handle = conv.register_forward_hook(self._forward)

    def _forward(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.sums is None:
            return self.norm(output)
        flat = output.detach().double().transpose(0, 1).reshape(output.shape[1], -1)
        self.sums[0] += flat.shape[1]
        self.sums[1] += flat.sum(dim=1)
        self.sums[2] += (flat**2).sum(dim=1)
        return output

    def factor(self) -> torch.Tensor:
        """γ / sqrt(running var + eps): what the norm multiplies the conv's output by."""
        norm = self.norm
        return norm.weight / torch.sqrt(norm.running_var + norm.eps)


class InsertedNorms:
    """BatchNorms attached after the un-normed convolutions of an imported module."""

    def __init__(self, imported: ImportedModel, model: ir.Model) -> None:
        self.imported = imported
        self.attached: list[_Attached] = []
        weights = {link.path: name for name, link in imported.links.items()}
        for path, conv in imported.module.named_modules():
            weight = weights.get(f"{path}.weight")
            if not isinstance(conv, _CONVS) or weight is None or conv.bias is None:
                continue
            if not _read_by_a_norm(model, conv):
                self.attached.append(_Attached(conv, weight))

    def __len__(self) -> int:
        return len(self.attached)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], limit: int) -> int:
        """Set each norm to the identity on the conv outputs of up to ``limit`` batches."""
        module = self.imported.module
        was_training = module.training
        for item in self.attached:
            zeros = torch.zeros(item.conv.out_channels, dtype=torch.float64)
            item.sums = [torch.zeros((), dtype=torch.float64), zeros, zeros.clone()]
        module.eval()
        used = 0
        try:
            for images, _ in batches:
                module(images.to(_device(module)))
                used += 1
                if used >= limit:
                    break
        finally:
            for item in self.attached:
                _set_identity(item)
            module.train(was_training)
        return used

    def view(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The linked arrays with each norm folded into its conv's weight (for scoring)."""
        out = dict(arrays)
        for item in self.attached:
            if item.weight in out:
                factor = item.factor().detach().double().cpu().numpy()
                shape = (-1,) + (1,) * (out[item.weight].ndim - 1)
                out[item.weight] = out[item.weight] * factor.reshape(shape)
        return out

    @torch.no_grad()
    def fold(self) -> None:
        """Fold every norm into its conv (eval-mode semantics) and detach it."""
        for item in self.attached:
            conv, norm = item.conv, item.norm
            factor = item.factor()
            shape = (-1,) + (1,) * (conv.weight.dim() - 1)
            conv.weight.mul_(factor.view(shape))
            conv.bias.copy_((conv.bias - norm.running_mean) * factor + norm.bias)
            item.handle.remove()
            del conv.inserted_norm
        self.attached.clear()


def _set_identity(item: _Attached) -> None:
    """Running statistics from the calibration sums; γ, β chosen so that norm(x) = x."""
    count, total, squares = item.sums
    item.sums = None
    if count <= 1:
        return
    mean = total / count
    var = (squares / count - mean**2).clamp_min(0.0)
    norm = item.norm
    norm.running_mean.copy_(mean.float())
    norm.running_var.copy_(var.float())
    norm.weight.copy_(torch.sqrt(var + norm.eps).float())
    norm.bias.copy_(mean.float())


def _read_by_a_norm(model: ir.Model, conv: nn.Module) -> bool:
    """Whether a normalisation reads the conv's output in the ONNX graph."""
    mapping = getattr(conv, "onnx_mapping", None)
    if mapping is None or not mapping.outputs:
        return True  # unknown: leave it alone
    value = next((v for n in model.graph for v in n.outputs if v.name == mapping.outputs[0]), None)
    return value is None or any(node.op_type in _NORM_OPS for node, _ in value.uses())


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
