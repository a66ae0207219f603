"""Feature distillation for a soft-masked student: its kept channels answer as the teacher's.

A soft-masked student is the teacher's own network with some channels gated off, so the two
share every channel's index: channel ``c`` of a tensor in the student is meant to carry what
channel ``c`` carried in the original. This module owns the loss that says so. At every gate
site (a Conv, Gemm or MatMul input that reads a group's channels, :mod:`~sfp_onnx.training.gates`)
it records the student's gated input and the teacher's input to the same module, and scores

    mean over sites of  ρ(‖s − g·t‖² / ‖g·t‖²),   ρ(x) = x for x ≤ 1, 2 − 1/x beyond

where ``g`` is the site's gate (1 kept, 0 masked): the masked channels are left out, the kept
ones are pulled toward the original's values. A student fine-tuned from a trained model stays
inside a relative gap of 1, where ρ is the identity. Beyond it ρ flattens toward 2 (value and
slope continuous at 1, slope 1/x²): a target no student can reach — an untrained network's
eval-mode activations, whose running statistics are not its batches' — stops pulling instead
of growing without bound, which at weight 100 made such a run diverge
(``benchmarks/results/sfp_design.md``). It is the layer-wise reconstruction objective of
channel pruning (He et al. 2017, ThiNet) applied end to end during fine-tuning, and a denser
signal than the logits alone when the budget is a few hundred steps. A one-shot pruned file
has other channel indices than its teacher, so this applies to soft masking only.

The records are taken only while gradients are on (training steps), and consumed by
:meth:`FeatureMatch.loss` once per step. With a decay the term's weight falls linearly to 0
over the first fraction of the steps (the kept channels are held to the original's while the
masks are new, then the logits alone finish the job); as a training hook this class counts the
steps, and a resumed run restores the count. Each epoch's record gets the mean scored gap
(``feature_gap``, before the weight; under DDP, over this process's share of the batches), so
an epoch line can say how much of the training loss is this term.
"""

from __future__ import annotations

import torch
from torch import nn

from sfp_onnx.errors import UsageError
from sfp_onnx.training.gates import ChannelGates
from sfp_onnx.training.hooks import TrainingHook

__all__ = ["FeatureMatch", "bounded_gap"]

_EPS = 1e-12


def bounded_gap(gap: torch.Tensor) -> torch.Tensor:
    """ρ: the relative gap itself up to 1, ``2 - 1/gap`` beyond (bounded by 2)."""
    return torch.where(gap <= 1.0, gap, 2.0 - 1.0 / gap.clamp_min(1.0))


class FeatureMatch(TrainingHook):
    """Records gated student inputs and teacher inputs at every gate site; scores the gap."""

    name = "feature_match"

    def __init__(
        self, student: nn.Module, teacher: nn.Module, gates: ChannelGates,
        decay: float | None = None,
    ) -> None:  # fmt: skip
        self.gates = gates
        self.decay = decay  # the fraction of the steps the weight takes to fall to 0
        self.total_steps = 0
        self.step = 0  # optimizer steps taken (named as in SoftMaskPruner)
        self.keys = list(dict.fromkeys((site.module, site.argument) for site in gates.sites))
        self.student: dict[tuple[str, int], torch.Tensor] = {}
        self.teacher: dict[tuple[str, int], torch.Tensor] = {}
        self._epoch_gaps: list[torch.Tensor] = []  # this epoch's scored losses (detached)
        self._handles = []
        for key in self.keys:
            module = key[0]
            try:
                theirs = teacher.get_submodule(module)
            except AttributeError:
                raise UsageError(
                    f"the teacher has no module {module!r}: feature distillation needs the "
                    "model being compressed as the teacher"
                ) from None
            ours = student.get_submodule(module)  # its gate's pre-hook runs first
            self._handles.append(ours.register_forward_pre_hook(self._recorder(self.student, key)))
            self._handles.append(
                theirs.register_forward_pre_hook(self._recorder(self.teacher, key, always=True))
            )

    def start(self, steps_per_epoch: int, epochs: int) -> None:
        self.total_steps = steps_per_epoch * epochs

    def after_step(self, step: int) -> None:
        self.step = step

    def epoch_end(self, epoch: int) -> dict:
        """The epoch's mean scored gap (none if the term was off all epoch); then forgets it."""
        if not self._epoch_gaps:
            return {}
        mean = torch.stack(self._epoch_gaps).mean().item()  # one sync per epoch, not per step
        self._epoch_gaps.clear()
        return {"feature_gap": mean}

    def state_dict(self) -> dict:  # checkpoints follow epoch_end: the epoch's gaps are gone
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def schedule_factor(self) -> float:
        """The share of the weight the next step uses: 1, or falling linearly to 0."""
        if self.decay is None or not self.total_steps:
            return 1.0
        return max(0.0, 1.0 - self.step / (self.decay * self.total_steps))

    @staticmethod
    def _recorder(store: dict, key: tuple[str, int], always: bool = False):
        argument = key[1]

        def record(_module: nn.Module, args: tuple) -> None:
            if always or torch.is_grad_enabled():
                store[key] = args[argument]

        return record

    def gaps(self) -> dict[tuple[str, int], torch.Tensor]:
        """Each site's relative gap, from the records since the last call (then forgotten)."""
        gaps = {}
        for key in self.keys:
            ours, theirs = self.student.get(key), self.teacher.get(key)
            if ours is None or theirs is None:
                continue
            factor = self.gates.factor_at(*key).to(theirs.device, theirs.dtype)
            shape = [1] * theirs.dim()
            shape[self.gates.axis_at(*key) % theirs.dim()] = -1
            target = (theirs.detach() * factor.view(shape)).float()
            gap = (ours.float() - target).pow(2).sum()
            gaps[key] = gap / target.pow(2).sum().clamp_min(_EPS)
        self.forget()
        return gaps

    def forget(self) -> None:
        """Drop the records of this step."""
        self.student.clear()
        self.teacher.clear()

    def loss(self) -> torch.Tensor:
        """The mean of ρ(:meth:`gaps`) over the sites this step recorded."""
        gaps = self.gaps()
        if not gaps:
            raise RuntimeError("feature distillation found no recorded site in this step")
        loss = bounded_gap(torch.stack(list(gaps.values()))).mean()
        self._epoch_gaps.append(loss.detach())
        return loss

    def remove(self) -> None:
        """Detach the recorders."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.forget()
