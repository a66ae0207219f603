"""The report folder of ``compress --report-dir``: the JSON report and the plots a user opens.

This module owns three pictures drawn from a :class:`~sfp_onnx.report.Report` (and nothing
else): ``training.png`` (loss, accuracy and kept channels per epoch), ``widths.png`` (every
channel group's width before and after) and ``before_after.png`` (top-1 accuracy and latency
of the input and the written model). matplotlib is imported here only, on first use.
"""

from __future__ import annotations

import os
from pathlib import Path

from sfp_onnx._io import atomic_path, write_json
from sfp_onnx.report import Report

__all__ = ["PLOTS", "write_report_dir"]

PLOTS = ("training.png", "widths.png", "before_after.png")


def write_report_dir(report: Report, folder: str | os.PathLike) -> list[Path]:
    """Write ``report.json`` and the plots into ``folder`` (created); returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report.to_json())
    written = [out / "report.json"]
    for name, draw in zip(PLOTS, (_training, _widths, _before_after), strict=True):
        figure = draw(report)
        with atomic_path(out / name, suffix=".png") as tmp:
            figure.savefig(tmp, dpi=110, format="png")
        written.append(out / name)
        matplotlib.pyplot.close(figure)
    return written


def _training(report: Report):
    import matplotlib.pyplot as plt

    epochs = report.extra["training"]["epochs"]
    numbers = [e["epoch"] for e in epochs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(numbers, [e["train_loss"] for e in epochs], marker="o", label="train loss")
    left.set_xlabel("epoch")
    left.set_ylabel("loss (with distillation, if on)")
    left.grid(alpha=0.3)
    right.plot(numbers, [100 * e["train_accuracy"] for e in epochs], marker="o", label="train")
    validated = [(e["epoch"], e["eval_accuracy"]) for e in epochs if e["eval_accuracy"] is not None]
    if validated:
        right.plot([n for n, _ in validated], [100 * a for _, a in validated], marker="s",
                   label="validation")  # fmt: skip
    right.set_xlabel("epoch")
    right.set_ylabel("top-1 (%)")
    right.grid(alpha=0.3)
    right.legend(loc="lower right")
    kept = [e["extra"].get("kept_channels") for e in epochs]
    if all(k is not None for k in kept):
        twin = right.twinx()
        twin.plot(numbers, kept, color="grey", linestyle=":", label="kept channels")
        twin.set_ylabel("channels kept in prunable groups", color="grey")
    from matplotlib.ticker import MaxNLocator

    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"training: {Path(report.input).name}")
    figure.tight_layout()
    return figure


def _widths(report: Report):
    import matplotlib.pyplot as plt

    groups = [g for g in report.groups if g.prunable]
    figure, axis = plt.subplots(figsize=(max(6, 0.35 * len(groups) + 2), 3.8))
    positions = range(len(groups))
    axis.bar(positions, [g.channels for g in groups], color="lightgrey", label="before")
    axis.bar(positions, [g.kept for g in groups], color="tab:blue", label="after")
    axis.set_xticks(list(positions), [str(g.id) for g in groups], fontsize=7)
    axis.set_xlabel("prunable channel group")
    axis.set_ylabel("channels")
    axis.legend()
    axis.set_title(f"group widths: {report.macs_reduction:.1%} of the MACs removed")
    figure.tight_layout()
    return figure


def _before_after(report: Report):
    import matplotlib.pyplot as plt

    accuracy = report.extra["accuracy"]
    latency = report.extra.get("latency_ms")
    panels = 2 if latency else 1
    figure, axes = plt.subplots(1, panels, figsize=(4 * panels + 1, 3.6), squeeze=False)
    labels = ("input", "written")
    axes[0][0].bar(labels, [100 * accuracy["before"], 100 * accuracy["after"]],
                   color=["lightgrey", "tab:blue"])  # fmt: skip
    axes[0][0].set_ylabel(f"top-1 (%), {report.extra['eval_samples']} test images")
    for x, value in enumerate((accuracy["before"], accuracy["after"])):
        axes[0][0].annotate(f"{value:.2%}", (x, 100 * value), ha="center", va="bottom")
    if latency:
        values = [latency["before"], latency["after"]]
        axes[0][1].bar(labels, values, color=["lightgrey", "tab:blue"])
        axes[0][1].set_ylabel(f"ms per batch of {latency['batch_size']} (p50)")
        axes[0][1].set_title(f"{values[0] / values[1]:.2f}x faster in onnxruntime")
    figure.tight_layout()
    return figure
