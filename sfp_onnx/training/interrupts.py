"""Stopping a training run cleanly: SIGTERM as Ctrl-C, and what to tell the user after either.

This module owns how an interrupt reaches the loop and how it is worded. SIGTERM (what
``timeout``, ``kill``, a scheduler or torchrun sends) raises KeyboardInterrupt in the main
thread, as Ctrl-C does; the loop (:mod:`sfp_onnx.training.train`) catches it between saves,
so the last completed epoch stays on disk, and raises :class:`TrainingInterrupted` with
what is saved and how to continue.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from sfp_onnx.errors import TrainingInterrupted

__all__ = ["interrupted", "last_checkpoint", "sigterm_raises_interrupt"]


@contextlib.contextmanager
def sigterm_raises_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while training (signals only reach the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def last_checkpoint(saved: int, path: Path) -> str:
    """Where the last good epoch (``saved``; 0: none) of a stopped run is, in words."""
    if saved == 0:
        return "no epoch was saved"
    return f"the last good checkpoint (epoch {saved}) is in {path.parent}"


def interrupted(epoch: int, saved: int, path: Path) -> TrainingInterrupted:
    """The error for an interrupt in ``epoch`` after ``saved`` saved epochs (0: none yet).

    Before the first checkpoint the (then empty) work folder is removed.
    """
    if saved == 0:
        with contextlib.suppress(OSError):  # leave no empty work folder behind
            path.parent.rmdir()
        return TrainingInterrupted(
            f"interrupted in epoch {epoch}, before the first checkpoint; rerun to start over"
        )
    return TrainingInterrupted(
        f"interrupted in epoch {epoch}; the last checkpoint (epoch {saved}) is in "
        f"{path.parent}; rerun with --resume to continue"
    )
