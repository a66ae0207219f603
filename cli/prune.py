"""``sfp-onnx analyze``, ``slim`` and ``prune``: the ONNX-only commands (no training)."""

from __future__ import annotations

import click
from rich.table import Table
from sfp_onnx.cli._options import round_to_option
from sfp_onnx.cli._render import console, human, render_report, status

import sfp_onnx
from sfp_onnx.graph.groups import width_label

__all__ = ["analyze", "prune", "slim"]

_model_arg = click.argument("model", type=click.Path(dir_okay=False, path_type=str))
_output_opt = click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the slim model.",
)
_report_opt = click.option(
    "--report", type=click.Path(dir_okay=False), help="Also write the report as JSON here."
)
_external_data_opt = click.option(
    "--external-data",
    is_flag=True,
    default=None,
    help="Write the weights to OUTPUT.data beside the model (automatic above 1.8 GB, "
    "protobuf's limit is 2 GB).",
)


@click.command()
@_model_arg
@click.option(
    "--rate",
    type=float,
    default=0.3,
    show_default=True,
    help="The pruning rate the plan (what each group width keeps) is shown for.",
)
@round_to_option(
    help="Keep multiples of K channels, as prune and compress would (auto: 16 on a "
    "CPU with AVX-512, else 8); groups no wider than K are kept whole.",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Write the analysis as JSON."
)
@click.option("--layers/--no-layers", default=True, show_default=True,
              help="Show the per-layer table.")  # fmt: skip
def analyze(model: str, rate: float, round_to, json_path: str | None, layers: bool) -> None:
    """Show which channels of MODEL can be pruned, what each layer costs, and what --rate cuts.

    Channels that must be kept or removed together (a conv's outputs, every branch of a
    residual Add, Concat segments) form one group. A group is blocked, with the reason shown,
    when it reaches a graph input or output or passes through an op that does not keep zero
    channels at zero. Each layer's status is its groups': the channels it writes are pruned,
    only the channels it reads shrink, or it is kept whole (and why).

    \b
    Examples:
      sfp-onnx analyze model.onnx
      sfp-onnx analyze model.onnx --rate 0.4 --round-to 16 --no-layers --json analysis.json
    """
    with status("analyzing"):
        result = sfp_onnx.analyze(model, rate=rate, round_to=round_to)
    if layers:
        console.print(_layer_table(result))
    console.print(_group_table(result))
    for line in _summary_lines(result):
        console.print(line, soft_wrap=True)
    if json_path:
        from sfp_onnx._io import write_json

        write_json(json_path, result.to_json())


def _layer_table(result) -> Table:
    table = Table(title="layers")
    for col in ("layer", "op", "output", "MACs", "params", f"at rate {result.rate:g}"):
        table.add_column(col, justify="right" if col in ("MACs", "params") else "left")
    for layer in result.layers:
        table.add_row(
            layer.name, layer.op_type, "x".join(map(str, layer.output_shape)),
            human(layer.macs), human(layer.params), result.layer_status.get(layer.name, "-"),
        )  # fmt: skip
    return table


def _group_table(result) -> Table:
    table = Table(title="channel groups")
    for col in ("id", "channels", f"kept at {result.rate:g}", "coupled layers", "status"):
        table.add_column(col)
    for group in result.groups:
        coupled = ", ".join(group.layers[:3]) + (
            f" +{len(group.layers) - 3}" if len(group.layers) > 3 else ""
        )
        table.add_row(
            str(group.id), str(group.channels), str(group.kept),
            coupled or "(no layer: a graph input)",
            "prunable" if group.prunable else f"blocked: {group.blocked}",
        )  # fmt: skip
    return table


def _summary_lines(result) -> list[str]:
    share = result.prunable_macs / result.stats.macs if result.stats.macs else 0.0
    rounding = f"round-to {result.round_to}" if result.round_to else "no rounding"
    plan = ", ".join(
        f"{width_label(c, p)}->{k} ({1 - k / c:.0%})" for (c, p), k in result.width_plan().items()
    )
    lines = [
        f"total: {human(result.stats.macs)} MACs, {human(result.stats.params)} parameters; "
        f"{sum(g.prunable for g in result.groups)} of {len(result.groups)} groups prunable",
        f"at rate {result.rate:g} with {rounding}: channels kept per group width "
        f"{plan or '(none)'}; the layers that shrink hold {share:.1%} of the MACs",
    ]
    if result.uncounted:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(result.uncounted.items()))
        lines.append(f"not counted in the MACs: {ops} (their cost is not sized here)")
    return lines


@click.command()
@_model_arg
@_output_opt
@_report_opt
@_external_data_opt
def slim(model: str, output: str, report: str | None, external_data: bool | None) -> None:
    """Physically remove the channels of MODEL that are already exactly zero.

    Use it after any soft pruning (SFP's reference code, torch.nn.utils.prune, ...): a
    channel goes when its filter row and bias (or the following norm's scale and shift) are
    zero. In a residual group a channel is kept if any branch still uses it. The result is
    checked against MODEL in onnxruntime; nothing is written if it differs.

    \b
    Examples:
      sfp-onnx slim masked.onnx -o slim.onnx
      sfp-onnx slim masked.onnx -o slim.onnx --report slim.json
    """
    with status("slimming"):
        result = sfp_onnx.slim(model, output, report=report, external_data=external_data)
    render_report(result)


@click.command()
@_model_arg
@_output_opt
@click.option(
    "--rate",
    type=float,
    help="Fraction of each group's channels to remove, in [0, 1).",
)
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(dir_okay=False),
    help="Instead of --rate: the per-group widths of a plan (`sfp-onnx plan`).",
)
@click.option(
    "--criterion",
    type=click.Choice(["l2", "l1", "fpgm"]),
    default="l2",
    show_default=True,
    help="Filter importance: L2 norm (SFP), L1 norm (PFEC) or FPGM (distance to the "
    "geometric median).",
)
@round_to_option(
    help="Keep a multiple of K channels per group (the kept count is rounded to the nearest "
    "multiple; groups narrower than K stay whole). auto: what this machine's fast kernels "
    "want (16 on a CPU with AVX-512, else 8; 8 with a CUDA GPU); none: floor(RATE x C) exactly.",
)
@click.option(
    "--save-masked",
    type=click.Path(dir_okay=False),
    help="Also write the zeroed, unsliced model (the reference OUT is checked against).",
)
@_report_opt
@_external_data_opt
def prune(model: str, output: str, rate: float | None, plan_path: str | None, criterion: str,
          round_to: int | str | None, save_masked: str | None, report: str | None,
          external_data: bool | None) -> None:  # fmt: skip
    """One-shot pruning without training: zero the weakest channels, then slim.

    Per prunable group, each channel index is scored over all coupled filters (summed), the
    lowest floor(RATE x C) are zeroed (never all; by default adjusted so that the kept count
    suits this machine's kernels, see --round-to), and the zeroed channels are removed. The
    summary shows the rate each group really got. For accuracy, fine-tune with
    `sfp-onnx compress` instead.

    \b
    Examples:
      sfp-onnx prune model.onnx --rate 0.3 -o model.slim.onnx
      sfp-onnx prune model.onnx --rate 0.5 --round-to none --criterion fpgm -o slim.onnx
      sfp-onnx prune model.onnx --plan plan.json -o model.slim.onnx
    """
    with status("pruning"):
        result = sfp_onnx.prune(
            model, output, rate=rate, plan=plan_path, criterion=criterion, round_to=round_to,
            save_masked=save_masked, report=report, external_data=external_data,
        )  # fmt: skip
    render_report(result)
