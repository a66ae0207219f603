"""Terminal rendering shared by the commands: numbers, the report summary, spinners."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from sfp_onnx.report import Report

__all__ = ["console", "human", "render_report", "status"]

console = Console(stderr=False, highlight=False)


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (decimal prefixes, as MACs and parameters are usually quoted)."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{prefix}{unit}"
    return f"{n:.0f}{unit}"


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for a step that takes a while (hidden when output is not a terminal)."""
    with console.status(message):
        yield


def render_report(report: Report) -> None:
    """The before/after table every model-writing command ends with."""
    table = Table(title=f"sfp-onnx {report.command}: {report.input} -> {report.output}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    rows = (
        ("MACs (1 sample)", report.before.macs, report.after.macs, ""),
        ("parameters", report.before.params, report.after.params, ""),
        ("file size", report.before.file_bytes, report.after.file_bytes, "B"),
    )
    for label, before, after, unit in rows:
        change = f"{(after / before - 1) * 100:+.1f}%" if before else "-"
        table.add_row(label, human(before, unit), human(after, unit), change)
    console.print(table)
    pruned = [g for g in report.groups if g.kept < g.channels]
    prunable = [g for g in report.groups if g.prunable]
    v = report.verification
    console.print(
        f"channel groups: {len(report.groups)} total, {len(prunable)} prunable, "
        f"{len(pruned)} slimmed; "
        f"channels kept {sum(g.kept for g in prunable)}/{sum(g.channels for g in prunable)} "
        "in prunable groups"
    )
    if pruned:
        rates = [g.realised_rate for g in pruned]
        console.print(
            f"realised rate in the {len(pruned)} slimmed groups: "
            f"{min(rates):.1%}–{max(rates):.1%} (min–max)"
        )
    console.print(
        f"exactness: max |Δ| = {v.max_abs_diff:.2e} (max |y| {v.max_abs_reference:.2e}) "
        f"on {v.samples} {v.inputs} inputs — {'exact' if v.exact else 'NOT exact'}"
    )
