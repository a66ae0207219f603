"""Per-epoch figures of a training run: the epoch record, ``metrics.csv``, the divergence watch.

This module owns what the loop measures about itself and how it is kept: :class:`EpochRecord`
(one per epoch, saved in every checkpoint), ``metrics.csv`` beside the checkpoint (rewritten
whole, atomically, every epoch, so a user can plot a run while it trains), and
:class:`LossWatch`, which stops a run whose loss explodes or stops being finite before it
spends an epoch on it. The loop itself is :mod:`sfp_onnx.training.train`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from sfp_onnx._io import write_text
from sfp_onnx.errors import TrainingDiverged

__all__ = ["EXPLODING_LOSS", "METRICS", "EpochRecord", "LossWatch", "write_metrics"]

METRICS = "metrics.csv"  # per-epoch metrics beside the checkpoint, rewritten every epoch
# Divergence: a window of steps whose mean loss exceeds this many times the run's first window.
EXPLODING_LOSS = 20.0


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did.

    Attributes:
        epoch: 1-based epoch number.
        train_loss: mean training loss over the epoch's batches (every rank's).
        train_accuracy: top-1 accuracy on the training batches, as they were trained on.
        eval_accuracy: top-1 accuracy on the evaluation set after the epoch-end hook, or None
            when the epoch was not evaluated.
        lr: learning rate of the epoch's last step.
        seconds: wall time of the epoch (training, hook and evaluation).
        extra: what the hooks' ``epoch_end`` returned (soft pruning: rate, kept channels...).
    """

    epoch: int
    train_loss: float
    train_accuracy: float
    eval_accuracy: float | None
    lr: float
    seconds: float
    extra: dict


def write_metrics(path: Path, history: list[EpochRecord]) -> None:
    """``metrics.csv``: one row per epoch so far (rewritten whole, atomically, every epoch)."""
    extra_keys = sorted({k for r in history for k, v in r.extra.items() if _scalar(v)})
    header = ["epoch", "train_loss", "train_accuracy", "val_accuracy", "lr", "seconds"]
    rows = [",".join([*header, *extra_keys])]
    for r in history:
        cells = [r.epoch, r.train_loss, r.train_accuracy, r.eval_accuracy, r.lr, r.seconds]
        cells += [r.extra.get(k) for k in extra_keys]
        rows.append(",".join("" if c is None else f"{c}" for c in cells))
    write_text(path, "\n".join(rows) + "\n")


def _scalar(value: object) -> bool:
    return isinstance(value, bool | int | float | str)


class LossWatch:
    """Stops a run whose loss is not finite, or explodes against the run's first steps.

    Args:
        lr: the run's peak learning rate, named in the message (what to lower).
        start_loss: the first window's mean loss of a resumed run (None: fresh).
    """

    def __init__(self, lr: float, start_loss: float | None = None) -> None:
        self.lr = lr
        self.start_loss = start_loss

    def check(self, epoch: int, window_loss: float) -> None:
        """Check the mean loss of the steps since the last check (``inf``: weights not finite).

        Raises:
            TrainingDiverged: naming the epoch and what to change; the epoch is not saved.
        """
        if self.start_loss is None and math.isfinite(window_loss):
            self.start_loss = window_loss
        limit = EXPLODING_LOSS * max(self.start_loss or 1.0, 1.0)
        if math.isfinite(window_loss) and window_loss <= limit:
            return
        what = f"loss {window_loss:.3g}"
        if window_loss == math.inf:
            what = "the weights are not finite"
        start = self.start_loss or float("nan")
        raise TrainingDiverged(
            f"training diverged in epoch {epoch} ({what}, against {start:.3g} at the start); "
            f"lower --lr (now {self.lr:g})"
        )
