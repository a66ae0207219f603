"""Stopping a training run cleanly: Ctrl-C and SIGTERM at safe points, and the words after.

This module owns how an interrupt reaches the loop and how it is worded. While training,
Ctrl-C and SIGTERM (what ``timeout``, ``kill``, a scheduler or torchrun sends) only set a flag;
the loop (:mod:`sfp_onnx.training.train`) calls :func:`stop_point` between steps and between
evaluation batches, which raises KeyboardInterrupt there. Raised from the signal handler itself,
the interrupt could land between a lock's acquire and its ``with`` block (a DataLoader queue's,
say) and leave the lock held, so that shutting the loader's workers down hung forever. A second
signal raises at once, for a user who insists. The loop catches the interrupt between saves, so
the last completed epoch stays on disk, and raises :class:`TrainingInterrupted` with what is
saved and how to continue.

Under torchrun the signal reaches every rank, but not at the same instant: one rank can find
the flag at a stop point that another has already passed, and leave while that one waits for
it in a collective, which then fails ("Connection closed by peer"). :func:`stop_was_requested`
lets the loop read that failure as the same interrupt rather than a crash.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from sfp_onnx.errors import TrainingInterrupted

__all__ = [
    "interrupted",
    "last_checkpoint",
    "stop_point",
    "stop_was_requested",
    "stops_at_safe_points",
]


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_stop_requested = threading.Event()  # cleared when a stop point raises it
_signalled = threading.Event()  # stays set until the block ends


@contextlib.contextmanager
def stops_at_safe_points() -> Iterator[None]:
    """Ctrl-C and SIGTERM request a stop that :func:`stop_point` raises (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(_signum: int, _frame: object) -> None:
        if _stop_requested.is_set():
            raise KeyboardInterrupt  # the second signal: stop now
        _stop_requested.set()
        _signalled.set()

    _stop_requested.clear()
    _signalled.clear()
    previous = {number: signal.signal(number, request_stop) for number in _STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _stop_requested.clear()
        _signalled.clear()


def stop_point() -> None:
    """Raise KeyboardInterrupt if a stop was requested (see :func:`stops_at_safe_points`)."""
    if _stop_requested.is_set():
        _stop_requested.clear()
        raise KeyboardInterrupt


def stop_was_requested() -> bool:
    """True once Ctrl-C or SIGTERM has arrived in this :func:`stops_at_safe_points` block."""
    return _signalled.is_set()


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
