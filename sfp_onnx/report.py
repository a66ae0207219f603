"""Reports: what a command did, as a record for people (tables) and machines (JSON).

This module owns the :class:`Report` of ``slim``/``prune``/``compress`` and the
:class:`AnalysisReport` of ``analyze``, and their JSON form. Every number in them is measured
on the files actually written (see :mod:`sfp_onnx.graph.measure`), never derived from the nominal
rate. Rendering as terminal tables is the CLI's job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sfp_onnx.graph.groups import ChannelGroup, width_label
from sfp_onnx.graph.measure import LayerCost, ModelStats
from sfp_onnx.runtime.verify import Verification

__all__ = [
    "AnalysisReport",
    "GroupSummary",
    "Report",
    "summarize_group",
    "width_label",  # re-exported from sfp_onnx.graph.groups
]


@dataclass(frozen=True)
class GroupSummary:
    """One channel group as reported: its width before and after, and why if it is blocked."""

    id: int
    channels: int
    kept: int
    layers: tuple[str, ...]
    prunable: bool
    blocked: str | None
    parts: int = 1

    @property
    def realised_rate(self) -> float:
        """Fraction of the group's channels removed."""
        return 1.0 - self.kept / self.channels if self.channels else 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON form, with the realised rate."""
        return {**asdict(self), "layers": list(self.layers), "realised_rate": self.realised_rate}


def summarize_group(group: ChannelGroup, removed: int = 0) -> GroupSummary:
    """Summary of ``group`` after ``removed`` of its channels were deleted."""
    return GroupSummary(
        id=group.id,
        channels=group.channels,
        kept=group.channels - removed,
        layers=group.layers,
        prunable=group.prunable,
        blocked=group.blocked,
        parts=group.parts,
    )


@dataclass(frozen=True)
class Report:
    """The outcome of a model-writing command (``slim``, ``prune``, ``compress``)."""

    command: str
    input: str
    output: str
    before: ModelStats
    after: ModelStats
    verification: Verification
    groups: tuple[GroupSummary, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def macs_reduction(self) -> float:
        """Fraction of multiply-accumulates removed."""
        return 1.0 - self.after.macs / self.before.macs if self.before.macs else 0.0

    @property
    def params_reduction(self) -> float:
        """Fraction of parameters removed."""
        return 1.0 - self.after.params / self.before.params if self.before.params else 0.0

    def to_json(self) -> dict[str, Any]:
        """The report JSON (schema in the README)."""
        from sfp_onnx._version import __version__

        return {
            "tool": f"sfp-onnx {__version__}",
            "command": self.command,
            "input": self.input,
            "output": self.output,
            "settings": self.settings,
            "macs": {"before": self.before.macs, "after": self.after.macs},
            "params": {"before": self.before.params, "after": self.after.params},
            "file_bytes": {"before": self.before.file_bytes, "after": self.after.file_bytes},
            "macs_reduction": self.macs_reduction,
            "verification": self.verification.to_json(),
            "groups": [g.to_json() for g in self.groups],
            **self.extra,
        }


@dataclass(frozen=True)
class AnalysisReport:
    """The outcome of ``analyze``: groups, per-layer costs, and what a rate would cut.

    Attributes:
        input: the model analysed.
        groups: every channel group, with the width it would keep at ``rate``.
        layers: MACs and parameters of each compute node.
        layer_status: per layer, in words, what pruning at ``rate`` does to it (from the
            groups it writes and reads), e.g. "pruned 64->48", "input 64->48", "blocked: ...".
        shrinking_layers: the layers whose output or input channels would shrink.
        stats: the model's totals.
        rate: the rate the plan is for.
        round_to: the channel multiple the plan keeps (None: no rounding).
        uncounted: op types (and counts) that cost compute this count does not size.
    """

    input: str
    groups: tuple[GroupSummary, ...]
    layers: tuple[LayerCost, ...]
    layer_status: dict[str, str]
    shrinking_layers: frozenset[str]
    stats: ModelStats
    rate: float = 0.3
    round_to: int | None = None
    uncounted: dict[str, int] = field(default_factory=dict)

    @property
    def prunable_macs(self) -> int:
        """MACs of the layers whose input or output channels shrink at ``rate``."""
        return sum(layer.macs for layer in self.layers if layer.name in self.shrinking_layers)

    def width_plan(self) -> dict[tuple[int, int], int]:
        """(width, parts) of a prunable group -> channels it keeps at ``rate``.

        ``parts`` > 1 for the channels of grouped convolutions (see :func:`width_label`).
        """
        shapes = sorted(self.groups, key=lambda g: (g.channels, g.parts))
        return {(g.channels, g.parts): g.kept for g in shapes if g.prunable}

    def to_json(self) -> dict[str, Any]:
        """JSON form of the analysis."""
        return {
            "input": self.input,
            "macs": self.stats.macs,
            "params": self.stats.params,
            "file_bytes": self.stats.file_bytes,
            "rate": self.rate,
            "round_to": self.round_to,
            "prunable_macs": self.prunable_macs,
            "prunable_macs_share": self.prunable_macs / self.stats.macs if self.stats.macs else 0.0,
            "uncounted_ops": self.uncounted,
            "width_plan": {width_label(*shape): k for shape, k in self.width_plan().items()},
            "groups": [g.to_json() for g in self.groups],
            "layers": [self._layer_json(layer) for layer in self.layers],
        }

    def _layer_json(self, layer: LayerCost) -> dict[str, Any]:
        status = self.layer_status.get(layer.name, "-")
        return {**asdict(layer), "status": status, "shrinks": layer.name in self.shrinking_layers}
