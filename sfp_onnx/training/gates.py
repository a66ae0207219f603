"""Channel gates: how a soft-pruning mask reaches the forward pass of the imported module.

This module owns one mechanism: where a group's channels are *read* — at every node that
mixes channels (the Conv, Gemm or MatMul consumers the channel analysis records) — a forward
pre-hook multiplies those input channels by the group's gate (1 kept, 0 masked, or a factor
in between). Everything between a channel's producers and its readers runs dense, and no
reader sees the channel: the network computes exactly what the surgery will make of it, in
training and in eval mode, because a channel the analysis calls prunable reaches the output
only through those readers (the exactness invariant of :mod:`sfp_onnx.graph.zeros`).

With ``importance`` the gate factors are leaves of the autograd graph, so every backward pass
also gives ``dL/dgate`` per channel and reader: the first-order change of the loss if the
channel were removed (a kept channel) or brought back (a masked one) — the Taylor importance
of Molchanov et al. (CVPR 2019), measured where the channel is used. Gating where the channel
is produced instead would make a masked channel's derivative vanish behind the next ReLU.

With ``straight_through`` the gates pass the full gradient back as if the channel were kept
(a DPF-like estimator); measured, it trains the kept layers with gradients of paths the forward
pass does not have and is not the default. Which channels to mask, and when, is
:mod:`sfp_onnx.training.soft_masks`' job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from sfp_onnx.errors import UnsupportedModelError
from sfp_onnx.graph.groups import Analysis, ChannelGroup
from sfp_onnx.training.import_torch import ImportedModel

__all__ = ["ChannelGates", "GateSite", "find_gate_sites"]


@dataclass(frozen=True)
class GateSite:
    """One input of one torch module that reads a group's channels, and where on it.

    Attributes:
        module: dotted path of the torch submodule (its input ``argument`` is multiplied).
        node: the ONNX node the module computes.
        argument: position of the gated input among the module's call arguments.
        group: the group id.
        axis: channel axis of that input.
        width: positions on that axis (all groups' channels times ``block``).
        start: position of the group's channel 0 on that axis.
        channels: the group's channels.
        block: positions per channel (1; H*W where a Flatten feeds a Gemm).
    """

    module: str
    node: str
    argument: int
    group: int
    axis: int
    width: int
    start: int
    channels: int
    block: int


def _node_modules(imported: ImportedModel, model: ir.Model) -> dict[str, tuple[str, tuple]]:
    """ONNX node name -> (path of the converted module, the ONNX names of its inputs)."""
    by_output = {}
    for path, module in imported.module.named_modules():
        mapping = getattr(module, "onnx_mapping", None)
        if mapping is not None and mapping.outputs:
            by_output[mapping.outputs[0]] = (path, tuple(mapping.inputs))
    found = {}
    for node in model.graph:
        if node.outputs and node.outputs[0].name in by_output:
            found[node.name] = by_output[node.outputs[0].name]
    return found


def find_gate_sites(
    imported: ImportedModel,
    model: ir.Model,
    analysis: Analysis,
    groups: Sequence[ChannelGroup],
) -> list[GateSite]:
    """Where each of ``groups`` is read, in the imported module.

    Raises:
        UnsupportedModelError: a reading node did not become a torch module that takes the
            group's tensor as an argument.
    """
    modules = _node_modules(imported, model)
    sites = []
    for group in groups:
        for point in group.consumers:
            module, inputs = modules.get(point.node, (None, ()))
            layout = analysis.layouts.get(point.value)
            if module is None or layout is None or point.value not in inputs:
                raise UnsupportedModelError(
                    f"cannot mask the channels of group {group.id} where node {point.node!r} "
                    "reads them during training; use --method sfp-paper for this model"
                )
            sites.append(
                GateSite(
                    module, point.node, inputs.index(point.value), group.id, layout.axis,
                    layout.channels * layout.block, point.start * layout.block, group.channels,
                    layout.block,
                )
            )  # fmt: skip
    return sites


class _Gate:
    """The per-position factor applied to one argument of one module (a forward pre-hook)."""

    def __init__(self, width: int, axis: int, argument: int, importance: bool) -> None:
        self.axis = axis
        self.argument = argument
        self.importance = importance  # keep dL/dfactor (the factor is an autograd leaf)
        self.factor = torch.ones(width, requires_grad=importance)
        self.through = torch.zeros(width, dtype=torch.bool)  # straight-through positions
        self.active = False  # all factors 1: the input passes untouched
        self.any_through = False

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        x = args[self.argument]
        if not (self.active or (self.importance and torch.is_grad_enabled())):
            return args
        if self.factor.device != x.device:  # once, after the module moved
            self.factor = self.factor.detach().to(x.device).requires_grad_(self.importance)
            self.through = self.through.to(x.device)
        shape = [1] * x.dim()
        shape[self.axis % x.dim()] = -1
        gated = x * self.factor.to(x.dtype).view(shape)
        if self.any_through:
            # forward: x·factor; backward: the full gradient at straight-through positions
            gated = torch.where(self.through.view(shape), x + (gated - x).detach(), gated)
        return (*args[: self.argument], gated, *args[self.argument + 1 :])

    def update(self, span: slice, values: torch.Tensor, through: torch.Tensor) -> None:
        with torch.no_grad():
            self.factor[span] = values.to(self.factor.device)
        self.through[span] = through.to(self.through.device)
        self.active = bool((self.factor != 1).any())
        self.any_through = bool(self.through.any())


class ChannelGates:
    """Gates on every site of the given groups; :meth:`set` changes one group's values."""

    def __init__(
        self,
        imported: ImportedModel,
        model: ir.Model,
        analysis: Analysis,
        groups: Sequence[ChannelGroup],
        *,
        straight_through: bool = False,
        importance: bool = False,
    ) -> None:
        self.sites = find_gate_sites(imported, model, analysis, groups)
        self.straight_through = straight_through
        self._gates: dict[tuple[str, int], _Gate] = {}
        self._handles = []
        for site in self.sites:
            key = (site.module, site.argument)
            if key not in self._gates:
                gate = _Gate(site.width, site.axis, site.argument, importance)
                owner = imported.module.get_submodule(site.module)
                self._handles.append(owner.register_forward_pre_hook(gate))
                self._gates[key] = gate

    def set(self, group: int, values: np.ndarray) -> None:
        """Gate values of ``group``'s channels: 1 keeps, 0 masks, in between scales."""
        factor = torch.as_tensor(np.asarray(values, dtype=np.float32))
        through = (factor < 1.0) & self.straight_through
        for site in self.sites:
            if site.group == group:
                span = slice(site.start, site.start + len(factor) * site.block)
                gate = self._gates[(site.module, site.argument)]
                gate.update(
                    span, factor.repeat_interleave(site.block),
                    through.repeat_interleave(site.block),
                )  # fmt: skip

    def take_gradient(self, group: int) -> torch.Tensor | None:
        """``dL/dgate`` of each of ``group``'s channels, summed over its readers, since the
        last call (the gates' gradients are reset); None before any backward pass."""
        total = None
        for site in self.sites:
            if site.group != group:
                continue
            grad = self._gates[(site.module, site.argument)].factor.grad
            if grad is None:
                return None
            span = grad[site.start : site.start + site.channels * site.block]
            per_channel = span.view(site.channels, site.block).sum(dim=1)
            total = per_channel if total is None else total + per_channel
        return total

    def reset_gradients(self) -> None:
        """Forget the gates' gradients (after :meth:`take_gradient` of every group)."""
        for gate in self._gates.values():
            gate.factor.grad = None

    def factors(self, group: int) -> list[torch.Tensor]:
        """The group's gate values at each of its sites (one value per channel)."""
        out = []
        for site in self.sites:
            if site.group == group:
                factor = self._gates[(site.module, site.argument)].factor.detach().cpu()
                out.append(
                    factor[site.start : site.start + site.channels * site.block : site.block]
                )
        return out

    def factor_at(self, module: str, argument: int) -> torch.Tensor:
        """The gate values applied to input ``argument`` of ``module``, one per position."""
        return self._gates[(module, argument)].factor.detach()

    def axis_at(self, module: str, argument: int) -> int:
        """The axis those gate values apply along."""
        return self._gates[(module, argument)].axis

    def remove(self) -> None:
        """Detach every hook: the module computes without gates again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
