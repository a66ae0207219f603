"""The training hook: a piece of fine-tuning the loop calls at named points.

This module owns the one interface between :func:`sfp_onnx.training.train.train` and what
rides on it — soft pruning (:mod:`~sfp_onnx.training.soft_masks`, :mod:`~sfp_onnx.training.sfp`),
BatchNorm re-estimation (:mod:`~sfp_onnx.training.norms`) — so the loop stays readable and
each piece lives in its own module. The loop calls, in order: ``start`` once (after a resume
has restored the state), ``after_step`` after every optimizer step, ``epoch_end`` after every
epoch's steps (before evaluation; its dict goes into the epoch's record), and saves
``state_dict`` in every checkpoint under the hook's ``name``.
"""

from __future__ import annotations

__all__ = ["TrainingHook"]


class TrainingHook:
    """Base class: every point is a no-op, so a hook overrides only what it needs."""

    name = "hook"  # the key of this hook's state in a checkpoint (unique per run)
    label = ""  # what its epoch_end does, in words, when that takes a while (shown to the user)

    def start(self, steps_per_epoch: int, epochs: int) -> None:
        """Called once before the first epoch of this call (fresh or resumed)."""

    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based, counted over the whole run)."""

    def epoch_end(self, epoch: int) -> dict:
        """Called after epoch ``epoch``'s steps; returns plain values for the epoch record."""
        return {}

    def state_dict(self) -> dict:
        """What a resumed run needs to continue bit-identically (plain values, tensors)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
