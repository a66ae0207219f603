"""``sfp-onnx plan``: per-group widths for a MACs budget, as a table and a JSON plan."""

from __future__ import annotations

import click
from rich.table import Table
from sfp_onnx.cli._options import round_to_option
from sfp_onnx.cli._render import console, human, status

import sfp_onnx

__all__ = ["plan"]


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--target-macs", required=True, type=float,
    help="Fraction of MODEL's multiply-adds to keep, in (0, 1]: 0.5 halves them.",
)  # fmt: skip
@round_to_option(
    help="Kept widths are multiples of K (and of a grouped conv's groups); auto: what this "
    "machine's fast kernels want (16 with AVX-512, else 8); none: any width.",
)
@click.option(
    "--max-rate", type=float, default=0.7, show_default=True,
    help="No group loses more than this fraction of its channels.",
)  # fmt: skip
@click.option(
    "--criterion", type=click.Choice(["l2", "l1", "fpgm"]), default="l2", show_default=True,
    help="The filter scores the choice weighs (as prune uses them).",
)  # fmt: skip
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False),
    help="Write the plan as JSON here (for `sfp-onnx prune --plan`).",
)  # fmt: skip
def plan(model: str, target_macs: float, round_to, max_rate: float, criterion: str,
         output: str | None) -> None:  # fmt: skip
    """Choose how many channels each group of MODEL keeps, to meet a MACs budget.

    Instead of one --rate for every group, each group is narrowed step by step where a step
    removes the least filter importance (L2 of the filters, BatchNorm folded in, as a share
    of the group's) per multiply-add saved, until the prediction meets --target-macs; cheap
    but important layers keep more. The MACs predicted for the widths are exact for the
    file `prune --plan` then writes (it reports the measured figure).

    \b
    Examples:
      sfp-onnx plan model.onnx --target-macs 0.5 -o plan.json
      sfp-onnx prune model.onnx --plan plan.json -o model.slim.onnx
    """
    with status("planning"):
        result = sfp_onnx.make_plan(
            model, target_macs=target_macs, round_to=round_to, max_rate=max_rate,
            criterion=criterion, output=output,
        )  # fmt: skip
    table = Table(title="channels kept per group")
    for column in ("id", "channels", "kept", "removed", "layers"):
        table.add_column(column, justify="left" if column == "layers" else "right")
    for group in result.groups:
        layers = ", ".join(group.layers[:2]) + (
            f" +{len(group.layers) - 2}" if len(group.layers) > 2 else ""
        )
        removed = 1 - group.kept / group.channels
        table.add_row(str(group.id), str(group.channels), str(group.kept), f"{removed:.0%}", layers)
    console.print(table)
    share = result.predicted_macs / result.full_macs
    console.print(
        f"MACs: {human(result.full_macs)} -> {human(result.predicted_macs)} predicted "
        f"({share:.1%} kept, target {target_macs:.1%})"
    )
    if not result.reached:
        console.print(
            f"the target is out of reach: every group is at its floor (--max-rate {max_rate:g}); "
            "raise --max-rate or the target"
        )
    if output:
        console.print(f"plan written to {output}; apply it with: sfp-onnx prune {model} --plan "
                      f"{output} -o OUT.onnx")  # fmt: skip
