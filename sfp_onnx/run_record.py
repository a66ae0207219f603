"""What a ``compress`` run was, in full: the report's settings and the lines that announce them.

This module owns the record that makes a run reproducible from its report — every resolved
setting (pruning, training, data, distillation, outputs), absolute paths, the exact command
line when the CLI gives it, versions and the device — and the one-line descriptions of the
data and of the pruning plan that ``compress`` prints before it trains. It computes nothing
the run depends on; the plan it describes is the one :func:`sfp_onnx.graph.soft_prune.prune_count`
gives each group width.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, fields
from importlib import metadata
from pathlib import Path

from sfp_onnx._version import __version__
from sfp_onnx.data.datasets import DataConfig, Datasets
from sfp_onnx.graph.groups import Analysis, width_label
from sfp_onnx.graph.soft_prune import prune_count

__all__ = [
    "describe_data", "describe_distillation", "describe_pruning", "rate_plan", "run_settings"
]  # fmt: skip

_PACKAGES = ("torch", "torchvision", "onnx", "onnx-ir", "onnxruntime-gpu", "onnxruntime", "numpy")


def _absolute(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _versions() -> dict[str, str]:
    found = {"sfp_onnx": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def run_settings(
    *, model, output, sfp, data: DataConfig, training, distill, options, workdir, device: str,
    feature_rule: str = "given",
) -> dict:  # fmt: skip
    """Every setting of a ``compress`` run, resolved, with paths made absolute."""
    data_settings = asdict(data)
    data_settings["root"] = _absolute(data.root)
    data_settings["mean"], data_settings["std"] = (list(v) for v in data.normalization)
    output_settings = {
        f.name: _absolute(getattr(options, f.name))
        if f.name in ("save_masked", "report", "report_dir")
        else getattr(options, f.name)
        for f in fields(options)
        if f.name not in ("progress", "workdir", "command_line")
    }
    return {
        "command_line": options.command_line,
        "input": _absolute(model),
        "output": _absolute(output),
        "workdir": _absolute(workdir),
        "pruning": asdict(sfp),
        "training": asdict(training),
        "data": data_settings,
        "distillation": {
            **asdict(distill),
            "teacher": _absolute(distill.teacher or model),
            "features": distill.feature_weight,
            "features_rule": feature_rule,
        },
        "outputs": output_settings,
        "device": device,
        "seed": training.seed,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": _versions(),
    }


def describe_data(data: DataConfig, datasets: Datasets) -> str:
    """One line: the images, how they are split, held and augmented, and the normalisation."""
    mean, std = (", ".join(f"{v:.4g}" for v in values) for values in (datasets.mean, datasets.std))
    val = f"{len(datasets.val)} validation / " if datasets.val is not None else ""
    held = "decoded once into memory" if datasets.decoded else "read from the files every epoch"
    source = data.root or "the download cache"
    return (
        f"data: {data.name} from {source}: {len(datasets.train)} training / {val}"
        f"{len(datasets.test)} test images, {held}; training images get "
        f"{datasets.augmentation}; normalised with mean ({mean}), std ({std})"
    )


def rate_plan(sfp, analysis: Analysis) -> dict[tuple[int, int], int]:
    """(group width, parts) -> channels kept at the target rate (after rounding).

    For trainable groups; parts > 1 for the channels of grouped convolutions, which lose the
    same count in each convolution group.
    """
    shapes = sorted({(g.channels, g.parts) for g in analysis.groups if g.prunable and g.filters})
    return {(c, p): c - prune_count(c, sfp.rate, sfp.round_to, p) for c, p in shapes}


def describe_pruning(sfp, analysis: Analysis) -> str:
    """One line: the method and, per group width, the rate asked for and the one realised."""
    if sfp.plan is not None:
        return _describe_plan(sfp)
    plan = rate_plan(sfp, analysis)
    widths = ", ".join(f"{width_label(c, p)}->{k} ({1 - k / c:.0%})" for (c, p), k in plan.items())
    widths = widths or "none"
    rounding = f"multiples of {sfp.round_to}" if sfp.round_to else "no rounding"
    return (
        f"pruning: {sfp.method}, rate {sfp.rate:g} ({sfp.criterion} scores, {rounding}); "
        f"channels kept per group width: {widths}; {_how(sfp)}"
    )


def _describe_plan(sfp) -> str:
    """One line for a run that trains to a plan's per-group widths."""
    plan = sfp.plan
    narrowed = sum(g.kept < g.channels for g in plan.groups)
    target = ", ".join(f"{k} {v:g}" for k, v in plan.target.items())
    sensitive = plan.importance == "sensitivity"
    weighed = "measured sensitivity" if sensitive else f"{plan.criterion} scores"
    return (
        f"pruning: {sfp.method} to a plan ({target}; widths weigh {weighed}): {narrowed} of "
        f"{len(plan.groups)} groups narrowed, {plan.removed_share:.1%} of their channels "
        f"removed, {plan.predicted_macs / plan.full_macs:.1%} of the MACs predicted to stay; "
        f"{_how(sfp)}"
    )


def describe_distillation(distill, sfp, feature_rule: str = "given") -> str:
    """One line: the teacher and the loss it adds (or that there is none), and how the
    feature weight was chosen when ``auto`` chose it."""
    if not distill.enabled:
        return "distillation: off (cross entropy only)"
    teacher = distill.teacher or "the input model"
    line = (
        f"distillation: from {teacher} (frozen, one extra forward pass per step): "
        f"{1 - distill.weight:g}·CE + {distill.weight:g}·T²·KL at T {distill.temperature:g}"
    )
    if distill.feature_weight > 0 and sfp.method != "sfp-paper":
        line += f", + {distill.feature_weight:g} × the kept channels' gap to its activations"
        if distill.features_decay is not None:
            line += f" (falling linearly to 0 over the first {distill.features_decay:.0%} of steps)"
    if feature_rule.startswith("auto"):
        line += f"; feature weight {feature_rule}"
    return line


def _how(sfp) -> str:
    if sfp.method == "sfp-paper":
        return "the paper's epoch-end zeroing of filter rows"
    phase = f"the first {1 - sfp.freeze:.0%} of the steps"
    if sfp.reselect_margin > 0:
        phase += f" (a masked channel returns only {sfp.reselect_margin:.0%} above a kept one)"
    return f"masks in the forward pass, re-chosen during {phase}, then frozen"
