"""Progress on the terminal for ``compress``: one live line for the current stretch, and the
lines worth keeping (notes, one summary per epoch) printed above it.

Reads the library's :class:`~sfp_onnx.training.train.ProgressEvent` stream; never shows more
than one bar, and removes it when the stretch ends, so no stale bar is left on screen. Where the
output is not a terminal (a log file, a pipe) there is no live line: each stretch is printed as
one ``· stage`` line as it starts, so a log shows what was running when it stopped.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

__all__ = ["CompressProgress", "epoch_line"]


def epoch_line(event, epochs: int) -> str:
    """``epoch 2/4: train loss 0.531, train acc 81.2%, val acc 80.1%, kept 352/448, ...``."""
    extra = event.extra or {}
    parts = [f"train loss {event.loss:.3f}", f"train acc {event.accuracy:.1%}"]
    if event.eval_accuracy is not None:
        parts.append(f"val acc {event.eval_accuracy:.1%}")
    if "kept_channels" in extra:
        frozen = ", masks frozen" if extra.get("frozen") else ""
        revived = f", {extra['revived']} brought back" if extra.get("revived") else ""
        parts.append(f"kept {extra['kept_channels']}/{extra['channels']} channels{revived}{frozen}")
    if "feature_gap" in extra:  # the loss above includes it, times --distill-features
        parts.append(f"kept-channel gap {extra['feature_gap']:.4f}")
    parts.append(f"lr {event.lr:.4g}")
    return f"epoch {event.epoch}/{epochs}: " + ", ".join(parts)


class CompressProgress:
    """Turns progress events into a live line and kept lines (a context manager)."""

    def __init__(self, console: Console, epochs: int) -> None:
        self.console = console
        self.epochs = epochs
        self.bar = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True,
        )  # fmt: skip
        self.task = None
        self.stage = ""

    def __enter__(self) -> CompressProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._clear()
        self.bar.__exit__(*exc)

    def __call__(self, event) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(event)

    def _show(self, description: str, completed: int = 0, total: int | None = None) -> None:
        if self.task is None:
            self.task = self.bar.add_task(description, total=total)
        self.bar.update(self.task, description=description, completed=completed, total=total)

    def _clear(self) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None

    def _on_stage(self, event) -> None:
        self._clear()
        self.stage = event.message
        if not self.console.is_terminal:
            self.console.print(f"· {self.stage}", soft_wrap=True, highlight=False)
        self._show(self.stage)

    def _on_note(self, event) -> None:
        self.console.print(event.message, soft_wrap=True, highlight=False)

    def _on_eval(self, event) -> None:
        self._show(self.stage, event.step, event.total)

    def _on_batch(self, event) -> None:
        description = (
            f"epoch {event.epoch}/{self.epochs}: train loss {event.loss:.3f}, "
            f"train acc {event.accuracy:.1%}"
        )
        self.stage = description
        self._show(description, event.step, event.total)

    def _on_epoch(self, event) -> None:
        self._clear()
        self.console.print(epoch_line(event, self.epochs), soft_wrap=True, highlight=False)
