"""The public operations: analyze, slim and prune an ONNX model.

Each function runs one whole command of the CLI as a library call — load, analyze, (zero),
rewrite, verify, write, measure — and returns its report. They take typed keywords, never
argv, print nothing, and raise :class:`sfp_onnx.errors.SfpError` for user-caused problems.
Nothing is written unless the rewritten model is exact; the input file is only read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from sfp_onnx._io import check_writable, write_json
from sfp_onnx._version import __version__
from sfp_onnx.errors import ExactnessError, UsageError
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.groups import Analysis
from sfp_onnx.graph.load import clone_model, load_model, save_model
from sfp_onnx.graph.measure import count_layer_costs, measure_model, uncounted_ops
from sfp_onnx.graph.rewrite import rewrite_model
from sfp_onnx.graph.soft_prune import CRITERIA, prune_count, soft_prune_model
from sfp_onnx.graph.zeros import removable_channels
from sfp_onnx.planning import Plan, allocation_criterion, make_plan, read_plan
from sfp_onnx.report import AnalysisReport, Report, summarize_group
from sfp_onnx.runtime.target import resolve_round_to
from sfp_onnx.runtime.verify import verify_models
from sfp_onnx.speed_targets import SpeedSearch, plan_for_speed

__all__ = ["Outputs", "analyze", "layer_statuses", "prune", "resolve_plan", "slim", "write_pruned"]

PathLike = str | os.PathLike


def analyze(
    model: PathLike, *, rate: float = 0.3, round_to: int | str | None = None
) -> AnalysisReport:
    """Channel groups, per-layer costs, and what pruning at ``rate`` would cut.

    Args:
        model: the ONNX file (only read).
        rate: the pruning rate the plan is for (what each group width would keep).
        round_to: keep multiples of this many channels (``"auto"``: this machine's, as
            ``prune``); a group no wider than it is kept whole.
    """
    if not 0.0 <= rate < 1.0:
        raise UsageError(f"--rate must be in [0, 1), got {rate}")
    multiple = resolve_round_to(round_to)
    ir_model = load_model(model)
    analysis = analyze_model(ir_model)
    proto = ir.serde.serialize_model(ir_model)
    layers = count_layer_costs(proto)
    cut = {g.id: prune_count(g.channels, rate, multiple, g.parts) for g in analysis.prunable_groups}
    status, shrinking = layer_statuses(analysis, cut, multiple)
    return AnalysisReport(
        input=str(model),
        groups=tuple(summarize_group(g, cut.get(g.id, 0)) for g in analysis.groups),
        layers=tuple(layers),
        layer_status=status,
        shrinking_layers=frozenset(shrinking),
        stats=measure_model(model),
        rate=rate,
        round_to=multiple,
        uncounted=uncounted_ops(proto),
    )


def layer_statuses(
    analysis: Analysis, cut: Mapping[int, int], round_to: int | None
) -> tuple[dict[str, str], set[str]]:
    """Per layer: what pruning does to it, read off its output and input groups."""
    status: dict[str, str] = {}
    shrinking: set[str] = set()
    for group in analysis.groups:
        removed = cut.get(group.id, 0)
        width = f"{group.channels}->{group.channels - removed}"
        for layer in group.layers:
            status[layer] = _output_status(group, removed, width, round_to)
            if removed:
                shrinking.add(layer)
        for point in group.consumers if removed else ():
            shrinking.add(point.node)
            if point.node not in status or status[point.node].startswith(("blocked", "kept")):
                status[point.node] = f"input {width}"
    return status, shrinking


def _output_status(group, removed: int, width: str, round_to: int | None) -> str:
    if not group.prunable:
        return f"blocked: {group.blocked}"
    if removed:
        return f"pruned {width}"
    if round_to and group.channels <= round_to:
        return f"kept whole ({group.channels} <= round-to {round_to})"
    return "kept (rate rounds to 0)"


@dataclass(frozen=True)
class Outputs:
    """Where a model-writing command writes, checked before any work starts."""

    model: PathLike  # the slim model
    report: PathLike | None = None  # the report JSON
    masked: PathLike | None = None  # the zeroed, unsliced reference model
    external_data: bool | None = None  # weights in <model>.data; None: only above 1.8 GB

    def check(self, source: PathLike) -> None:
        """Fail early when a path cannot be written or would overwrite the input."""
        for path in (self.model, self.report, self.masked):
            if path is not None:
                check_writable(path, inputs=(source,))


def slim(
    model: PathLike,
    output: PathLike,
    *,
    report: PathLike | None = None,
    external_data: bool | None = None,
) -> Report:
    """Remove every channel that is already exactly zero wherever it is read.

    This is the last step of any soft pruning (SFP, ``torch.nn.utils.prune``, ...): channels
    whose filters (or the following norm's scale and shift) are zero are deleted; in a
    coupled group a channel is kept if any branch still uses it.
    """
    outputs = Outputs(output, report=report, external_data=external_data)
    outputs.check(model)
    masked = load_model(model)
    analysis = analyze_model(masked)
    return write_pruned(
        masked, analysis, source=model, outputs=outputs, command="slim", settings={}
    )


def prune(
    model: PathLike,
    output: PathLike,
    *,
    rate: float | None = None,
    plan: Plan | PathLike | None = None,
    criterion: str = "l2",
    round_to: int | str | None = None,
    save_masked: PathLike | None = None,
    report: PathLike | None = None,
    external_data: bool | None = None,
) -> Report:
    """One-shot pruning: zero the least important ⌊rate·C⌋ channels of each group, then slim.

    Args:
        model: input ONNX file (only read).
        output: where the slim model goes.
        rate: fraction of each prunable group's channels to remove, in [0, 1).
        plan: instead of ``rate``, per-group widths (a :class:`~sfp_onnx.planning.Plan` or
            its JSON file, from :func:`sfp_onnx.planning.make_plan` / ``sfp-onnx plan``);
            its rounding replaces ``round_to``.
        criterion: ``l2`` (SFP's default), ``l1`` or ``fpgm``.
        round_to: keep a multiple of this many channels per group (fast kernels want 8/16);
            ``"auto"``: the multiple this machine's fast kernels want (see
            :func:`sfp_onnx.runtime.target.resolve_round_to`); None: no rounding.
        save_masked: also write the zeroed, unsliced model (the exactness reference).
        report: also write the report JSON here.
        external_data: write the weights to ``<output>.data`` (None: only above 1.8 GB).
    """
    if (rate is None) == (plan is None):
        raise UsageError("give exactly one of --rate and --plan")
    if rate is not None and not 0.0 <= rate < 1.0:
        raise UsageError(f"--rate must be in [0, 1), got {rate}")
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if plan is not None and not isinstance(plan, Plan):
        plan = read_plan(plan)
    multiple = plan.round_to if plan is not None else resolve_round_to(round_to)
    outputs = Outputs(output, report=report, masked=save_masked, external_data=external_data)
    outputs.check(model)
    masked = load_model(model)
    analysis = analyze_model(masked)
    counts = plan.removed_counts(analysis) if plan is not None else None
    soft_prune_model(masked, analysis.groups, rate=rate or 0.0, criterion=criterion,
                     round_to=multiple, counts=counts)  # fmt: skip
    settings = {"rate": rate, "criterion": criterion, "round_to": multiple}
    if plan is not None:
        settings = {"plan": plan.target, "criterion": criterion, "round_to": multiple,
                    "predicted_macs": round(plan.predicted_macs)}  # fmt: skip
    if round_to == "auto" and plan is None:
        settings["round_to_requested"] = "auto"
    return write_pruned(
        masked, analysis, source=model, outputs=outputs, command="prune", settings=settings
    )


def write_pruned(
    masked: ir.Model,
    analysis: Analysis,
    *,
    source: PathLike,
    outputs: Outputs,
    command: str,
    settings: Mapping[str, object],
    verify_feeds: list[dict[str, np.ndarray]] | None = None,
    verify_description: str | None = None,
) -> Report:
    """Slim a masked model, verify it against the masked one, write both, measure, report.

    Shared by ``slim``, ``prune`` and ``compress``: the surgery removes exactly the channels
    that are zero at every consumer, and nothing is written unless the result is exact.
    """
    removed = removable_channels(masked, analysis)
    slim_model = clone_model(masked)
    rewrite_model(slim_model, analysis, removed)
    provenance = {
        "sfp_onnx.version": __version__,
        "sfp_onnx.command": command,
        **{f"sfp_onnx.{k}": str(v) for k, v in settings.items()},
        "sfp_onnx.source": Path(source).name,
    }
    slim_model.metadata_props.update(provenance)
    verification = verify_models(
        masked, slim_model, feeds=verify_feeds, description=verify_description
    )
    if not verification.finite:
        raise ExactnessError(
            f"the model gives non-finite outputs (NaN or Inf) on {verification.inputs} inputs; "
            "nothing was written"
        )
    if not verification.exact:
        raise ExactnessError(
            f"the rewritten model differs from the masked one by {verification.max_abs_diff:.3g} "
            f"(max |y| {verification.max_abs_reference:.3g}); nothing was written"
        )
    _check_interface(source, slim_model)
    if outputs.masked is not None:
        save_model(masked, outputs.masked, external_data=outputs.external_data)
    save_model(slim_model, outputs.model, external_data=outputs.external_data)
    result = Report(
        command=command,
        input=str(source),
        output=str(outputs.model),
        before=measure_model(source),
        after=measure_model(outputs.model),
        verification=verification,
        groups=tuple(summarize_group(g, len(removed.get(g.id, ()))) for g in analysis.groups),
        settings=dict(settings),
    )
    if outputs.report is not None:
        write_json(outputs.report, result.to_json())
    return result


def _interface(graph: onnx.GraphProto) -> list[tuple[str, str]]:
    return [(v.name, str(v.type).replace("\n", " ")) for v in [*graph.input, *graph.output]]


def _check_interface(source: PathLike, rewritten: ir.Model) -> None:
    original = onnx.load(str(source), load_external_data=False).graph
    initializers = {t.name for t in original.initializer}
    before = [io for io in _interface(original) if io[0] not in initializers]
    after = _interface(ir.serde.serialize_model(rewritten).graph)
    if before != after:
        raise ExactnessError(
            "the rewritten model's inputs/outputs differ from the original's; nothing was written"
        )


def resolve_plan(
    model: PathLike,
    *,
    rate: float | None,
    plan: PathLike | None,
    target_macs: float | None,
    target_speedup: float | None = None,
    target_latency_ms: float | None = None,
    speed: Mapping[str, object] | None = None,
) -> Plan | None:
    """The plan a run asks for: read from ``plan``, made for a target, or None (``rate``).

    ``speed`` holds the allocation settings (``round_to``, ``max_rate``, ``criterion``, and a
    measured ``sensitivity`` from :func:`sfp_onnx.planning.measure_plan_sensitivity`) and,
    for a speed target, how to time it (the fields of
    :class:`sfp_onnx.speed_targets.SpeedSearch`) and a ``progress`` callback.

    Raises:
        UsageError: not exactly one of the rate, the plan and the targets given.
    """
    options = (
        ("--rate", rate), ("--plan", plan), ("--target-macs", target_macs),
        ("--target-speedup", target_speedup), ("--target-latency-ms", target_latency_ms),
    )  # fmt: skip
    given = [name for name, value in options if value is not None]
    if len(given) != 1:
        said = f" (got {' and '.join(given)})" if given else ""
        raise UsageError(f"give exactly one of {', '.join(n for n, _ in options)}{said}")
    settings = dict(speed or {})
    allocation = {
        k: settings.pop(k)
        for k in ("round_to", "max_rate", "criterion", "sensitivity")
        if k in settings
    }
    allocation["criterion"] = allocation_criterion(allocation.get("criterion", "l2"))
    if allocation.get("sensitivity") is not None and (rate is not None or plan is not None):
        raise UsageError(
            "--sensitivity weighs the widths of a target; give --target-macs, --target-speedup "
            "or --target-latency-ms instead of " + ("--rate" if plan is None else "--plan")
        )
    if plan is not None:
        return read_plan(plan)
    if target_macs is not None:
        return make_plan(model, target_macs=target_macs, **allocation)
    if target_speedup is not None or target_latency_ms is not None:
        progress = settings.pop("progress", None)
        timed, _points = plan_for_speed(
            model, target_speedup=target_speedup, target_latency_ms=target_latency_ms,
            **allocation, search=SpeedSearch(**settings), progress=progress,
        )  # fmt: skip
        return timed
    return None
