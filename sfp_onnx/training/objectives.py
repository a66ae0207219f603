"""Training objectives: what loss the fine-tuning loop minimises.

This module owns the loss. :class:`CrossEntropy` is plain supervised fine-tuning;
:class:`Distillation` adds knowledge distillation from a frozen teacher — for ``compress``, the
user's own ONNX model imported once more, so the pruned student learns to answer as the
original did (Hinton et al. 2015; NNCF's compression-aware training offers the same). Both are
``nn.Module``s, so the loop moves them (and the teacher) to the training device with ``to``.
The teacher costs one extra forward pass per step, under the loop's autocast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sfp_onnx.errors import UsageError

if TYPE_CHECKING:
    from sfp_onnx.training.feature_match import FeatureMatch

__all__ = [
    "CrossEntropy",
    "DistillConfig",
    "Distillation",
    "auto_feature_weight",
    "distillation_term",
    "resolve_features",
]

# ``features=None`` (auto) sets the feature weight by the run's optimizer steps. Measured
# (benchmarks/results/sfp_design.md, "The feature weight by run length"): weight 100 gained 1.2-2.2
# points at 157-237 steps on three networks, was neutral at 468 (+0.05) and 782 (-0.09) and lost
# 0.4-0.5 at 1,560.
AUTO_FEATURE_WEIGHT = 100.0
AUTO_FULL_UNTIL = 300  # steps up to which the weight is whole
AUTO_OFF_FROM = 600  # steps from which it is 0 (linear between)


@dataclass(frozen=True)
class DistillConfig:
    """Distillation from the input model; validated on construction (raises UsageError)."""

    enabled: bool = True  # teach the pruned model with the original's logits
    weight: float = 0.5  # share of the loss from the teacher: (1-w)·CE + w·T²·KL
    temperature: float = 4.0  # softens both distributions (T² keeps the gradient scale)
    teacher: str | None = None  # the teacher's ONNX file; None: the model being compressed
    # weight of the kept channels' match to the teacher's (soft masks, the model itself as the
    # teacher; 0: off). None: by the run's length (resolve_features), 100 for a few hundred
    # steps, where it gains, and 0 from 600, where it gains nothing or costs (sfp_design.md)
    features: float | None = None
    # the fraction of the steps over which that weight falls linearly to 0 (None: constant)
    features_decay: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise UsageError(f"--distill-weight must be in [0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise UsageError(f"--distill-temperature must be > 0, got {self.temperature}")
        if self.features is not None and self.features < 0:
            raise UsageError(f"--distill-features must be >= 0, got {self.features}")
        if self.features_decay is not None and not 0.0 < self.features_decay <= 1.0:
            raise UsageError(
                f"--distill-features-decay must be in (0, 1], got {self.features_decay}"
            )
        if self.features and self.teacher is not None:
            raise UsageError(
                "--distill-features matches channels with the model being compressed; "
                "with --teacher give --distill-features 0"
            )

    @property
    def feature_weight(self) -> float:
        """The weight of the feature match (0 without distillation, or before ``None`` is
        resolved by :func:`resolve_features`)."""
        return (self.features or 0.0) if self.enabled else 0.0


def auto_feature_weight(steps: int) -> float:
    """The feature weight ``auto`` gives a run of ``steps`` optimizer steps."""
    if steps <= AUTO_FULL_UNTIL:
        return AUTO_FEATURE_WEIGHT
    if steps >= AUTO_OFF_FROM:
        return 0.0
    share = (AUTO_OFF_FROM - steps) / (AUTO_OFF_FROM - AUTO_FULL_UNTIL)
    return round(AUTO_FEATURE_WEIGHT * share, 1)


def resolve_features(
    config: DistillConfig, steps: int, *, unmatched: str | None = None
) -> tuple[DistillConfig, str]:
    """``config`` with its feature weight a number, and how that number was chosen.

    Args:
        config: the distillation asked for; ``features=None`` is resolved, a number is kept.
        steps: the run's optimizer steps.
        unmatched: why the student's channels cannot be matched to the teacher's (e.g. the
            paper's method, which has no masks), if they cannot; the weight is then 0.
    """
    if config.features is not None:
        return config, "given"
    if not config.enabled:
        unmatched = "no distillation"
    elif config.teacher is not None:
        unmatched = "another model teaches: its channels are not the student's"
    if unmatched:
        return replace(config, features=0.0), f"auto: off ({unmatched})"
    weight = auto_feature_weight(steps)
    rule = f"{AUTO_FEATURE_WEIGHT:g} up to {AUTO_FULL_UNTIL} steps, 0 from {AUTO_OFF_FROM}"
    return replace(config, features=weight), f"auto: {weight:g} for a {steps}-step run ({rule})"


class CrossEntropy(nn.Module):
    """Cross entropy against the labels."""

    def forward(
        self, logits: torch.Tensor, images: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return F.cross_entropy(logits, targets)


def distillation_term(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch.

    Exactly 0 when the student's logits equal the teacher's.
    """
    log_student = F.log_softmax(student.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class Distillation(nn.Module):
    """``(1-w)·CE(student, labels) + w·T²·KL(teacher ‖ student)`` with a frozen teacher.

    With ``features`` (a :class:`~sfp_onnx.training.feature_match.FeatureMatch` over this
    teacher), ``config.feature_weight`` times its gap between the kept channels (times the
    schedule's factor at this step, with ``config.features_decay``) is added.
    """

    def __init__(
        self, teacher: nn.Module, config: DistillConfig, features: FeatureMatch | None = None
    ) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.config = config
        self.features = features

    def train(self, mode: bool = True) -> Distillation:
        """The teacher stays in eval mode (its BatchNorm statistics are the original's)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(
        self, logits: torch.Tensor, images: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(images)
        weight = self.config.weight
        hard = F.cross_entropy(logits, targets) if weight < 1.0 else logits.new_zeros(())
        soft = distillation_term(logits, teacher, self.config.temperature)
        loss = (1.0 - weight) * hard + weight * soft
        if self.features is not None and self.config.feature_weight > 0:
            feature_weight = self.config.feature_weight * self.features.schedule_factor()
            if feature_weight > 0:
                loss = loss + feature_weight * self.features.loss()
            else:  # decayed away: drop this step's records instead of scoring them
                self.features.forget()
        return loss
