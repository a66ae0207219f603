"""Soft pruning with masks in the forward pass: the default way ``compress`` prunes.

This module owns *when* channels are masked. The weights stay dense and every prunable group
carries a mask that the forward pass applies through :mod:`sfp_onnx.training.gates`, so the
network trains as the structure it will have. Over the run:

1. pruning phase (the first ``1 - freeze`` of the optimizer steps; 10% by default): every
   ``reselect_every`` steps (8 selections by default) and at epoch ends, the masks are re-chosen
   from the current scores, at a rate that ramps to the target (``schedule``: ASFP's asymptotic
   ramp, or the target from the start), each group one channel at a time to its rounded final
   width (:func:`~sfp_onnx.graph.soft_prune.ramp_count`). The scores are the dense weights'
   norms (``l2``, ``l1``, ``fpgm``: what one-shot ``prune`` uses, a following norm folded in) or
   the Taylor importance measured at the gates since the last selection (``taylor``: the mean
   square of ``dL/dgate`` per step — for a kept channel what removing it would cost, for a
   masked one what bringing it back would gain). A channel masked at one selection is back at
   the next if its score has overtaken a kept one's by more than ``reselect_margin`` (10% by
   default: hysteresis, so that near-ties do not swap back and forth): the "soft" of SFP.
   Masked channels are multiplied by 0, or by a factor decaying linearly to 0 over the phase
   (``masked_scale="decay"``, as SRFP); ``straight_through`` passes them the full gradient
   (DPF-like).
2. freeze phase (the rest): the masks are those of the final selection, at exactly the
   target rate, and the network recovers with its final structure.

Measured on CIFAR-10 (benchmarks/results/sfp_design.md): a short pruning phase wins at
fine-tuning budgets — every re-selection that swaps channels costs accuracy the remaining steps
must win back, which is also why the margin pays — and neither decay, straight-through nor
Taylor scores beat L2 there.

:meth:`SoftMaskPruner.finish` then zeroes the masked channels in the dense tensors and removes
the gates: the written network is the one the last training step ran, to the bit. The pruner
is a training hook (``start``, ``after_step``, ``epoch_end``, ``state_dict``) that
:func:`sfp_onnx.training.train.train` calls; its masks go into every checkpoint.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch

from sfp_onnx.graph.groups import Analysis, ChannelGroup
from sfp_onnx.graph.soft_prune import ramp_count, select_channels
from sfp_onnx.training import distributed
from sfp_onnx.training.channels import (
    ArrayView,
    check_linked,
    choose_channels,
    favour_kept,
    mask_changes,
    trainable_groups,
    zero_channels,
)
from sfp_onnx.training.gates import ChannelGates
from sfp_onnx.training.hooks import TrainingHook
from sfp_onnx.training.import_torch import ImportedModel
from sfp_onnx.training.sfp import SfpConfig, ramp_rate

__all__ = ["SELECTIONS", "SoftMaskPruner", "selection_steps"]

SELECTIONS = 8  # re-selections over the selection phase when reselect_every is not given


def selection_steps(total: int, freeze: float) -> int:
    """The last step of the selection phase: the freeze phase is the final ``freeze`` share."""
    return max(1, min(total, math.ceil((1.0 - freeze) * total)))


class SoftMaskPruner(TrainingHook):
    """Masks the weakest channels of every prunable group in the forward pass (a train hook).

    Args:
        imported: the module being fine-tuned, with its links to the ONNX initializers.
        model: the ONNX graph the module came from.
        analysis: its channel analysis.
        config: the rate, criterion and schedule (``method`` must be ``soft-mask``).
        view: how scoring sees the linked arrays (e.g. with inserted norms folded in).
    """

    name = "soft_masks"

    def __init__(
        self,
        imported: ImportedModel,
        model: ir.Model,
        analysis: Analysis,
        config: SfpConfig,
        view: ArrayView | None = None,
    ) -> None:
        self.imported = imported
        self.config = config
        self.view = view
        self.groups: list[ChannelGroup] = trainable_groups(analysis.groups)
        check_linked(imported, self.groups)
        self.taylor = config.criterion == "taylor"
        self.gates = ChannelGates(
            imported, model, analysis, self.groups, straight_through=config.straight_through,
            importance=self.taylor,
        )  # fmt: skip
        # a plan's channels to remove per group id, and the step its widths move in
        self.planned = config.plan.removed_counts(analysis) if config.plan else None
        self.steps = {g.id: g.step for g in config.plan.groups} if config.plan else {}
        self.masks: dict[int, np.ndarray] = {}
        self.importance: dict[int, torch.Tensor] = {}  # Σ (dL/dgate)² since the last selection
        self.importance_steps = 0
        self.rate = 0.0
        self.total = self.last_selection = self.reselect_every = 1
        self.steps_per_epoch = 1
        self.step = 0
        self._changes = _no_changes()

    # --- the hook points -----------------------------------------------------------------
    def start(self, steps_per_epoch: int, epochs: int) -> None:
        """Size the schedule to the run; apply the masks (fresh: the step-0 selection)."""
        self.steps_per_epoch = steps_per_epoch
        self.total = steps_per_epoch * epochs
        self.last_selection = selection_steps(self.total, self.config.freeze)
        self.reselect_every = self.config.reselect_every or max(
            1, round(self.last_selection / SELECTIONS)
        )
        if self.step == 0 and not self.masks:
            self._select(0)
        self._apply()

    def after_step(self, step: int) -> None:
        """Re-select every ``reselect_every`` steps of the selection phase, and at its end."""
        self.step = step
        if self.taylor and step <= self.last_selection:
            self._gather_importance()
        every = self.reselect_every
        if step <= self.last_selection and (step % every == 0 or step == self.last_selection):
            self._select(step)
            self._apply()

    def epoch_end(self, epoch: int) -> dict:
        """Re-select (still in the selection phase) and report this epoch's masks."""
        if self.step < self.last_selection:
            self._select(self.step)
            self._apply()
        record = {
            "rate": self.rate,
            "kept_channels": self.kept_channels,
            "channels": sum(g.channels for g in self.groups),
            "frozen": self.step >= self.last_selection,
            **self._changes,
        }
        self._changes = _no_changes()
        return record

    def state_dict(self) -> dict:
        return {
            "masks": {str(k): v.tolist() for k, v in self.masks.items()},
            "rate": self.rate,
            "step": self.step,
            "importance": {str(k): v.cpu() for k, v in self.importance.items()},
            "importance_steps": self.importance_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.masks = {int(k): np.asarray(v, dtype=np.int64) for k, v in state["masks"].items()}
        self.rate = float(state["rate"])
        self.step = int(state["step"])
        self.importance = {int(k): v for k, v in state["importance"].items()}
        self.importance_steps = int(state["importance_steps"])

    # --- after training -----------------------------------------------------------------
    def finish(self) -> dict[int, np.ndarray]:
        """Zero the masked channels in the dense weights and take the gates off.

        The forward pass already saw these channels as zero, so neither the training-mode
        nor the eval-mode output changes. Returns the masked channels per group id.
        """
        for group in self.groups:
            zero_channels(self.imported, group, self.masks.get(group.id, np.zeros(0, np.int64)))
        self.gates.remove()
        return dict(self.masks)

    @property
    def kept_channels(self) -> int:
        return sum(g.channels - len(self.masks.get(g.id, ())) for g in self.groups)

    # --- internals ----------------------------------------------------------------------
    def _progress(self, step: int) -> float:
        return min(1.0, step / self.last_selection)

    def _gather_importance(self) -> None:
        """Add this step's squared ``dL/dgate`` of every channel (Taylor importance)."""
        for group in self.groups:
            gradient = self.gates.take_gradient(group.id)
            if gradient is None:
                return
            square = gradient.detach().double() ** 2
            previous = self.importance.get(group.id)
            self.importance[group.id] = square if previous is None else previous + square
        self.gates.reset_gradients()
        self.importance_steps += 1

    def _choose(self) -> dict[int, np.ndarray] | None:
        """The channels to mask now; None when there is nothing to score them by yet."""
        config = self.config
        counts = self._counts()
        if not self.taylor:
            return choose_channels(
                self.imported, self.groups, rate=self.rate, criterion=config.criterion,
                round_to=config.round_to, view=self.view, counts=counts, masked=self.masks,
                margin=config.reselect_margin,
            )  # fmt: skip
        if not self.importance_steps:
            return None
        chosen = {}
        for group in self.groups:
            score = (self.importance[group.id] / self.importance_steps).cpu().numpy()
            masked = self.masks.get(group.id, np.zeros(0, np.int64))
            score = favour_kept(score, masked, config.reselect_margin)
            chosen[group.id] = select_channels(score, counts.get(group.id, 0), group.parts)
        self.importance, self.importance_steps = {}, 0
        return chosen

    def _counts(self) -> dict[int, int]:
        """The channels to mask per group at the current rate.

        Each group ramps as the rate does, to exactly its final width: the rate's rounded
        count (:func:`ramp_count`: one channel at a time on the way), or a plan's width
        (between, rounded up to the plan's step for the group).
        """
        config = self.config
        if self.planned is None:
            return {
                g.id: ramp_count(g.channels, self.rate, config.rate, config.round_to, g.parts)
                for g in self.groups
            }
        share = self.rate / self.config.rate if self.config.rate > 0 else 0.0
        counts = {}
        for group in self.groups:
            removed = self.planned.get(group.id, 0)
            step = self.steps.get(group.id, 1)
            kept = min(
                group.channels, step * math.ceil((group.channels - share * removed) / step - 1e-9)
            )
            counts[group.id] = group.channels - kept
        return counts

    def _select(self, step: int) -> None:
        config = self.config
        previous = self.rate
        self.rate = ramp_rate(self._progress(step), config.rate, config.schedule)
        chosen = self._choose()
        if chosen is None:  # nothing measured since the last selection: keep its masks
            self.rate = previous
            return
        chosen = distributed.broadcast_from_main(chosen)  # Taylor scores differ per rank
        changes = mask_changes(self.masks, chosen)
        for key, value in changes.items():
            self._changes[key] += value
        self._changes["selections"] += 1
        self.masks = chosen
        if distributed.check_agreement(self.imported.module, chosen):
            self._changes["rank_checks"] += 1

    def _masked_scale(self) -> float:
        if self.config.masked_scale == "zero" or self.step >= self.last_selection:
            return 0.0
        return 1.0 - self._progress(self.step)

    def _apply(self) -> None:
        scale = self._masked_scale()
        for group in self.groups:
            values = np.ones(group.channels, dtype=np.float32)
            values[self.masks.get(group.id, np.zeros(0, np.int64))] = scale
            self.gates.set(group.id, values)


def _no_changes() -> dict[str, int]:
    """The per-epoch counters: channels newly masked and revived, selections, rank checks."""
    return {"masked": 0, "revived": 0, "selections": 0, "rank_checks": 0}
