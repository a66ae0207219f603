"""Plans: per-group widths chosen for a budget, that ``prune --plan`` applies.

This module owns the :class:`Plan` record (what a user reads, edits and passes back), its JSON
form, and :func:`make_plan`, which loads a model, predicts its MACs for any widths
(:class:`~sfp_onnx.graph.allocate.MacsModel`) and lets
:func:`~sfp_onnx.graph.allocate.allocate_widths` choose them for a MACs target, weighing the
filter scores or the loss rises :func:`measure_plan_sensitivity` measures (it opens the data
and hands the candidate widths to :mod:`sfp_onnx.training.sensitivity`). A plan names
each group by id *and* by the layers that create its channels, so applying it to another
model (or an edited one) is refused in one line instead of pruning the wrong channels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from sfp_onnx._io import write_json
from sfp_onnx._version import __version__
from sfp_onnx.errors import UsageError
from sfp_onnx.graph.allocate import MacsModel, allocate_widths, candidate_widths, width_step
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.groups import Analysis
from sfp_onnx.graph.load import load_model
from sfp_onnx.graph.measure import count_layer_costs
from sfp_onnx.graph.soft_prune import CRITERIA
from sfp_onnx.runtime.target import resolve_round_to

if TYPE_CHECKING:
    from sfp_onnx.data.datasets import DataConfig
    from sfp_onnx.training.sensitivity import Sensitivity, SensitivityConfig

__all__ = [
    "Plan",
    "PlanGroup",
    "allocation_criterion",
    "make_plan",
    "measure_plan_sensitivity",
    "read_plan",
]

PathLike = str | os.PathLike
_FORMAT = "sfp-onnx plan 1"


@dataclass(frozen=True)
class PlanGroup:
    """One channel group of the plan: its width now and the width it keeps."""

    id: int
    channels: int
    kept: int
    step: int
    layers: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """Per-group widths for a model, and what they were chosen for.

    Attributes:
        model: the ONNX file the plan was made for.
        target: what was asked (``{"macs": 0.5}``: keep half the MACs).
        round_to, max_rate, criterion: the allocation's settings.
        groups: the prunable groups, each with the width it keeps.
        full_macs: the model's MACs; predicted_macs: the prediction for the plan's widths.
        reached: False when every group is at its floor and the target is still above.
        measured: for a speed target, how the plan's pruned file ran when it was timed
            (:mod:`sfp_onnx.speed_targets`); None for a MACs target.
        importance: what the widths weighed: ``filters`` (the filter scores' shares) or
            ``sensitivity`` (measured loss rises, kept in ``sensitivity``).
    """

    model: str
    target: dict[str, float]
    round_to: int | None
    max_rate: float
    criterion: str
    groups: tuple[PlanGroup, ...]
    full_macs: int
    predicted_macs: float
    reached: bool
    measured: dict[str, object] | None = None
    importance: str = "filters"
    sensitivity: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON form (what ``plan -o`` writes and ``prune --plan`` reads)."""
        data = asdict(self)
        data["groups"] = [{**asdict(g), "layers": list(g.layers)} for g in self.groups]
        return {"format": _FORMAT, "sfp_onnx": __version__, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        """The plan a :meth:`to_json` dict describes."""
        if data.get("format") != _FORMAT:
            raise UsageError(f"not an sfp-onnx plan (format {data.get('format')!r})")
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k != "groups" and k in data}
        groups = tuple(PlanGroup(**{**g, "layers": tuple(g["layers"])}) for g in data["groups"])
        _check_numbers(fields, groups)
        return cls(**fields, groups=groups)

    @property
    def removed_share(self) -> float:
        """The fraction of the planned groups' channels the plan removes."""
        channels = sum(g.channels for g in self.groups)
        return 1.0 - sum(g.kept for g in self.groups) / channels if channels else 0.0

    def removed_counts(self, analysis: Analysis) -> dict[int, int]:
        """Channels to remove per group id of ``analysis``, checked against the plan.

        Raises:
            UsageError: the model's groups are not the ones the plan was made for.
        """
        groups = {g.id: g for g in analysis.groups}
        counts = {}
        for planned in self.groups:
            group = groups.get(planned.id)
            if group is None or group.layers != planned.layers or not group.prunable:
                raise UsageError(
                    f"the plan does not fit this model: its group {planned.id} "
                    f"({', '.join(planned.layers[:2]) or 'no layer'}) is not one of the model's "
                    "prunable groups; make the plan for this model with `sfp-onnx plan`"
                )
            whole = planned.kept == group.channels
            if not whole and (planned.kept % planned.step or not 0 < planned.kept < group.channels):
                raise UsageError(
                    f"the plan keeps {planned.kept} of group {planned.id}'s {group.channels} "
                    f"channels; a width must be all of them or a multiple of {planned.step} "
                    "below that"
                )
            counts[planned.id] = group.channels - planned.kept
        return counts


def make_plan(
    model: PathLike,
    *,
    target_macs: float,
    round_to: int | str | None = None,
    max_rate: float = 0.7,
    criterion: str = "l2",
    sensitivity: Sensitivity | None = None,
    output: PathLike | None = None,
) -> Plan:
    """Choose per-group widths that keep ``target_macs`` of the model's MACs.

    Args:
        model: the ONNX file (only read).
        target_macs: fraction of the MACs to keep, in (0, 1].
        round_to: kept widths are multiples of this (``"auto"``: this machine's kernels).
        max_rate: no group loses more than this fraction of its channels.
        criterion: the filter score behind the choice (``l2``, ``l1``, ``fpgm``).
        sensitivity: measured loss rises per group and width
            (:func:`measure_plan_sensitivity`) to weigh instead of the filter scores' shares.
        output: also write the plan's JSON here.
    """
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    multiple = resolve_round_to(round_to)
    ir_model = load_model(model)
    analysis = analyze_model(ir_model)
    macs_model = MacsModel(
        ir_model, analysis, count_layer_costs(ir.serde.serialize_model(ir_model))
    )
    allocation = allocate_widths(
        ir_model, analysis, macs_model, target_fraction=target_macs, round_to=multiple,
        max_rate=max_rate, criterion=criterion,
        costs=sensitivity.rises if sensitivity is not None else None,
    )  # fmt: skip
    groups = {g.id: g for g in analysis.groups}
    plan = Plan(
        model=str(model), target={"macs": target_macs}, round_to=multiple, max_rate=max_rate,
        criterion=criterion,
        groups=tuple(
            PlanGroup(gid, groups[gid].channels, kept, width_step(groups[gid], multiple),
                      groups[gid].layers)
            for gid, kept in sorted(allocation.kept.items())
        ),
        full_macs=allocation.full_macs, predicted_macs=allocation.predicted_macs,
        reached=allocation.reached,
        importance="filters" if sensitivity is None else "sensitivity",
        sensitivity=sensitivity.to_json() if sensitivity is not None else None,
    )  # fmt: skip
    if output is not None:
        write_json(output, plan.to_json())
    return plan


def _check_numbers(fields: Mapping[str, Any], groups: Sequence[PlanGroup]) -> None:
    """Raise TypeError where a plan file's figures are not numbers (a hand-edited plan)."""

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    target = fields.get("target")
    if not isinstance(target, Mapping) or not all(number(v) for v in target.values()):
        raise TypeError(f"its target {target!r} is not a name -> number mapping")
    for name in ("full_macs", "predicted_macs", "max_rate"):
        if not number(fields.get(name)):
            raise TypeError(f"its {name} {fields.get(name)!r} is not a number")
    for group in groups:
        if not all(isinstance(getattr(group, f), int) for f in ("id", "channels", "kept", "step")):
            raise TypeError(f"its group {group.id!r} has a width that is not an integer")


def allocation_criterion(criterion: str) -> str:
    """The filter score a plan weighs for a run that trains with ``criterion``.

    Taylor scores (dL/dmask) exist only once training runs, so a plan made before it weighs
    L2 norms; the other criteria are filter scores and weigh as they are.
    """
    return "l2" if criterion == "taylor" else criterion


def measure_plan_sensitivity(
    model: PathLike,
    data: DataConfig,
    *,
    round_to: int | str | None = None,
    max_rate: float = 0.7,
    criterion: str = "l2",
    config: SensitivityConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Sensitivity:
    """Measure how the loss rises when each group alone is cut to each width a plan may give.

    The candidate widths are those :func:`make_plan` can choose (``round_to``, ``max_rate``),
    at most ``config.widths_per_group`` per group. The loss is measured on the data's
    validation split (held back from the training images; 10% when ``data`` sets none), the
    BatchNorm statistics re-estimated on training batches
    (:func:`sfp_onnx.training.sensitivity.measure_sensitivity`).
    """
    # torch and the data stage load here only: a MACs plan needs neither
    from sfp_onnx.data.datasets import load_datasets
    from sfp_onnx.runtime.evaluate import read_signature
    from sfp_onnx.training.sensitivity import SensitivityConfig, measure_sensitivity

    config = config or SensitivityConfig()
    multiple = resolve_round_to(round_to)
    ir_model = load_model(model)
    analysis = analyze_model(ir_model)
    widths = {
        g.id: candidate_widths(g, multiple, max_rate, config.widths_per_group)
        for g in analysis.prunable_groups if g.filters
    }  # fmt: skip
    signature = read_signature(model)
    split = replace(data, val_split=data.val_split or 0.1, seed=config.seed)
    datasets = load_datasets(split, signature.input_size[1:], channels=signature.input_size[0])
    return measure_sensitivity(
        ir_model, datasets.train, datasets.val, widths, criterion=criterion, config=config,
        progress=progress,
    )  # fmt: skip


def read_plan(path: PathLike) -> Plan:
    """The plan in a JSON file written by ``sfp-onnx plan`` (one-line errors otherwise)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"plan file {path} not found") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read plan file {path}: {exc}") from None
    try:
        return Plan.from_json(data)
    except (KeyError, TypeError) as exc:
        raise UsageError(f"plan file {path} is incomplete or malformed ({exc})") from None
