"""Soft Filter Pruning: its settings, its rate schedules, and the paper's epoch-end step.

This module owns :class:`SfpConfig` — how ``compress`` prunes while it fine-tunes — and the
rate schedules both methods share (constant, as SFP; or ASFP's asymptotic ramp). Two methods:

- ``soft-mask`` (the default): whole channels masked in the forward pass, re-chosen during
  training, frozen for the last phase (:mod:`sfp_onnx.training.soft_masks`);
- ``sfp-paper``: the procedure of He et al. (IJCAI 2018), kept so the difference can be
  measured. :class:`PaperSfpPruner` zeroes, at every epoch end, the filters with the lowest
  score (summed over the coupled filters of a group) in place; the tensors stay full size, so
  the next epoch's updates may grow them back. An intermediate epoch zeroes the filter rows
  (and their own biases) only, as the paper does; after the last epoch every producer slice of
  the chosen channels is zeroed, so each is exactly 0 and the surgery removes it. On a
  BatchNorm network this is undone between zeroings (the norm rescales a regrowing filter),
  which is why it is not the default (see the README's accuracy table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sfp_onnx.errors import UsageError
from sfp_onnx.graph.groups import Analysis, ChannelGroup
from sfp_onnx.graph.soft_prune import (
    CRITERIA,
    filter_rows,
    norm_factor,
    prune_count,
    scoring_tensors,
    select_channels,
)
from sfp_onnx.training import distributed
from sfp_onnx.training.channels import (
    check_linked,
    choose_channels,
    mask_changes,
    trainable_groups,
    zero_channels,
)
from sfp_onnx.training.hooks import TrainingHook
from sfp_onnx.training.import_torch import ImportedModel


class ChannelPlan(Protocol):
    """What soft pruning needs of a plan (:class:`sfp_onnx.planning.Plan` is one; training
    sits below the planning layer, so it names only this)."""

    groups: tuple  # each with ``id`` and ``step`` (the width moves in multiples of it)

    def removed_counts(self, analysis: Analysis) -> dict[int, int]: ...


__all__ = [
    "MASKED_SCALES",
    "METHODS",
    "SCHEDULES",
    "PaperSfpPruner",
    "SfpConfig",
    "ramp_rate",
    "rate_at",
    "recalibration_batches",
]

METHODS = ("soft-mask", "sfp-paper")
SCHEDULES = ("constant", "asymptotic")
MASKED_SCALES = ("zero", "decay")
_FILTER_KINDS = frozenset({"filter", "bias"})


@dataclass(frozen=True)
class SfpConfig:
    """How ``compress`` prunes while it fine-tunes; validated on construction (UsageError)."""

    rate: float  # final fraction of each group's channels removed (the paper's P)
    method: str = "soft-mask"  # soft-mask (masks in the forward pass) | sfp-paper
    criterion: str = "l2"  # l2 (SFP) | l1 | fpgm | taylor (soft-mask: dL/dgate, measured)
    schedule: str = "asymptotic"  # rate over training: asymptotic (ASFP ramp) | constant (SFP)
    round_to: int | str | None = None  # keep a multiple of K channels per group; "auto"
    # soft-mask: optimizer steps between re-selections; None: 8 selections over the phase
    reselect_every: int | None = None
    # soft-mask: a masked channel comes back only with a score this share above a kept one's
    # (hysteresis; measured: 0.1 gains up to 0.57 points over 0 at budget (b), sfp_design.md)
    reselect_margin: float = 0.1
    freeze: float = 0.9  # soft-mask: final fraction of the steps with the masks frozen
    masked_scale: str = "zero"  # soft-mask: masked channels x0, or a factor decaying to 0
    straight_through: bool = False  # soft-mask: masked channels still get the full gradient
    independent_layers: bool = False  # sfp-paper: each layer picks its own filters
    # batches re-estimating BN statistics after each epoch's masks; None: 50 for sfp-paper
    # (its zeroing changes every statistic), 0 for soft-mask (measured: no gain, 20% slower)
    bn_recalibration: int | None = None
    # soft-mask: per-group widths from `sfp-onnx plan` in place of one rate for every group
    # (``rate`` is then the plan's share of channels removed, for the record)
    plan: ChannelPlan | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise UsageError(f"--rate must be in [0, 1), got {self.rate}")
        criteria = (*CRITERIA, "taylor") if self.method == "soft-mask" else tuple(CRITERIA)
        for name, allowed in (
            ("method", METHODS), ("criterion", criteria), ("schedule", SCHEDULES),
            ("masked_scale", MASKED_SCALES),
        ):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise UsageError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}"
                )
        if self.reselect_every is not None and self.reselect_every < 1:
            raise UsageError(f"--reselect-every is {self.reselect_every}; give 1 or more steps")
        if self.reselect_margin < 0.0:
            raise UsageError(f"--reselect-margin is {self.reselect_margin}; give 0 or more")
        if not 0.0 <= self.freeze < 1.0:
            raise UsageError(f"--freeze must be in [0, 1), got {self.freeze}")
        if self.bn_recalibration is not None and self.bn_recalibration < 0:
            raise UsageError(f"--bn-recalibration is {self.bn_recalibration}; give 0 or more")
        if self.plan is not None and self.method != "soft-mask":
            raise UsageError("a plan's per-group widths need --method soft-mask")
        if self.independent_layers and self.method != "sfp-paper":
            raise UsageError(
                "--independent-layers is the reference code's mode; add --method sfp-paper"
            )


def recalibration_batches(config: SfpConfig) -> int:
    """BatchNorm re-estimation batches per epoch: the given number, or the method's default."""
    if config.bn_recalibration is not None:
        return config.bn_recalibration
    return 50 if config.method == "sfp-paper" else 0


def ramp_rate(progress: float, rate: float, schedule: str = "constant") -> float:
    """The pruning rate at ``progress`` (0 to 1) through the pruning phase.

    constant: ``rate`` throughout (SFP). asymptotic: ``rate·(1 - exp(-k·progress))`` with k such
    that 3/4 of the rate is reached a quarter of the way (ASFP), and exactly ``rate`` at 1.
    """
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "constant" or progress >= 1.0:
        return rate
    return rate * (1.0 - math.exp(-4.0 * math.log(4.0) * max(progress, 0.0)))


def rate_at(epoch: int, epochs: int, rate: float, schedule: str = "constant") -> float:
    """The rate the paper's step applies at the end of ``epoch`` (1-based) of ``epochs``."""
    return ramp_rate(epoch / max(epochs, 1), rate, schedule)


class PaperSfpPruner(TrainingHook):
    """The paper's SFP as a training hook: zero the weakest filters at every epoch end."""

    name = "sfp_paper"
    label = "zeroing the weakest filters"

    def __init__(self, imported: ImportedModel, groups: list[ChannelGroup], config: SfpConfig):
        self.imported = imported
        self.config = config
        self.groups = trainable_groups(groups)
        check_linked(imported, self.groups)
        self.masks: dict[int, np.ndarray] = {}
        self.epochs = 1

    def start(self, steps_per_epoch: int, epochs: int) -> None:
        self.epochs = epochs

    def epoch_end(self, epoch: int) -> dict:
        """Choose and zero this epoch's channels; exact (every producer slice) at the last."""
        return self.step(epoch, self.epochs)

    def state_dict(self) -> dict:
        return {"masks": {str(k): v.tolist() for k, v in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.masks = {int(k): np.asarray(v, dtype=np.int64) for k, v in state["masks"].items()}

    def finish(self) -> dict[int, np.ndarray]:
        """Zero the last epoch's channels again in every producer slice, exactly.

        A no-op on the weights the last epoch end zeroed, unless something changed them
        since: a BatchNorm put back into a BN-folded export for training gives the zeroed
        conv a bias again when it is folded away. Returns the channels per group id.
        """
        for group in self.groups:
            zero_channels(self.imported, group, self.masks.get(group.id, np.zeros(0, np.int64)))
        return dict(self.masks)

    def step(self, epoch: int, epochs: int) -> dict:
        """Zero the channels chosen at the end of ``epoch``; returns the kept/total counts."""
        config = self.config
        rate = rate_at(epoch, epochs, config.rate, config.schedule)
        final = epoch >= epochs
        if config.independent_layers:
            masks = {g.id: self._zero_per_layer(g, rate, final) for g in self.groups}
        else:
            masks = choose_channels(
                self.imported, self.groups, rate=rate, criterion=config.criterion,
                round_to=config.round_to,
            )  # fmt: skip
            for group in self.groups:
                if final:
                    zero_channels(self.imported, group, masks[group.id])
                else:
                    filters = {piece.node for piece in group.filters}
                    zero_channels(
                        self.imported, group, masks[group.id], kinds=_FILTER_KINDS, layers=filters
                    )
        changes = mask_changes(self.masks, masks)
        self.masks = masks
        total = sum(g.channels for g in self.groups)
        zeroed = sum(len(m) for m in masks.values())
        checked = distributed.check_agreement(self.imported.module, masks)
        return {
            "rate": rate, "kept_channels": total - zeroed, "channels": total, **changes,
            "rank_checks": int(checked),
        }  # fmt: skip

    def _zero_per_layer(self, group: ChannelGroup, rate: float, final: bool) -> np.ndarray:
        """The reference code's choice: each filter picks its own lowest-norm channels.

        Only channels every coupled filter chose can become exactly zero (the union of kept
        channels is what the surgery keeps); at the final epoch those get the exact zeroing.
        """
        arrays = self.imported.arrays(scoring_tensors([group]))
        count = prune_count(group.channels, rate, self.config.round_to, group.parts)
        common = None
        for piece in group.filters:
            rows = filter_rows(arrays[piece.tensor], piece, group.channels).astype(np.float64)
            factor = norm_factor(group, piece.node, arrays)
            if factor is not None and factor.size == group.channels:
                rows = rows * factor[:, None]
            chosen = select_channels(CRITERIA[self.config.criterion](rows), count, group.parts)
            zero_channels(self.imported, group, chosen, kinds=_FILTER_KINDS, layers={piece.node})
            common = set(chosen.tolist()) if common is None else common & set(chosen.tolist())
        shared = np.array(sorted(common or ()), dtype=np.int64)
        if final:
            zero_channels(self.imported, group, shared)
        return shared
