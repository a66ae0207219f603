"""``sfp-onnx plan``: per-group widths for a MACs or speed budget, as a table and a JSON plan."""

from __future__ import annotations

import click
from rich.progress import Progress
from rich.table import Table
from sfp_onnx.cli._options import DATA_OPTIONS, SENSITIVITY_OPTIONS, round_to_option
from sfp_onnx.cli._render import console, human, status

import sfp_onnx

__all__ = ["measured_sensitivity", "plan", "plan_verdict", "refuse_a_miss"]


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--target-macs", type=float,
    help="Fraction of MODEL's multiply-adds to keep, in (0, 1]: 0.5 halves them.",
)  # fmt: skip
@click.option(
    "--target-speedup", type=float,
    help="Instead: run this many times faster, timed in onnxruntime on this machine.",
)  # fmt: skip
@click.option(
    "--target-latency-ms", type=float,
    help="Instead: run under this many milliseconds per batch (timed as --target-speedup).",
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
    "--bench-batch", type=click.IntRange(min=1), default=1, show_default=True,
    help="Speed targets: the batch size the latency is timed at.",
)  # fmt: skip
@click.option(
    "--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu",
    show_default=True, help="Speed targets: the onnxruntime provider timed.",
)  # fmt: skip
@click.option(
    "--timing-seconds", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
    help="Speed targets: how long each candidate and MODEL are timed per round (the plan "
    "that looks like the answer is timed again for twice as long).",
)  # fmt: skip
@click.option(
    "--cache-dir", type=click.Path(file_okay=False), default=None,
    help="Speed targets: where timed plans are kept for reruns (default: "
    "$XDG_CACHE_HOME/sfp-onnx, else ~/.cache/sfp-onnx).",
)  # fmt: skip
@click.option(
    "--strict", is_flag=True,
    help="Speed targets: fail when the measured speedup misses the target by more than 5%.",
)  # fmt: skip
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False),
    help="Write the plan as JSON here (for `prune --plan` and `compress --plan`).",
)  # fmt: skip
@SENSITIVITY_OPTIONS
@DATA_OPTIONS
def plan(model: str, output: str | None, **opts) -> None:
    """Choose how many channels each group of MODEL keeps, to meet a MACs or speed budget.

    Instead of one --rate for every group, each group is narrowed step by step where a step
    removes the least filter importance (L2 of the filters, BatchNorm folded in, as a share
    of the group's) per multiply-add saved, until the prediction meets --target-macs; cheap
    but important layers keep more. The MACs predicted for the widths are exact for the
    file `prune --plan` then writes (it reports the measured figure).

    With --target-speedup or --target-latency-ms the MACs target is searched instead: each
    round plans, prunes and times the file against MODEL in onnxruntime (interleaved, as
    `bench`, --timing-seconds per round), until the measured speedup is within 3%, and the
    plan that looks like the answer is timed again for longer to confirm it; the timings are
    cached, so a rerun measures nothing it already has.

    With --sensitivity (and the data options, as compress takes them) each group is weighed
    instead by the loss rise measured when it alone is cut to each candidate width, with
    BatchNorm statistics re-estimated, on images held back from the training set.

    \b
    Examples:
      sfp-onnx plan model.onnx --target-macs 0.5 -o plan.json
      sfp-onnx plan model.onnx --target-speedup 2 --bench-batch 32 -o plan.json
      sfp-onnx plan model.onnx --target-macs 0.5 --sensitivity --data cifar10 -o plan.json
      sfp-onnx prune model.onnx --plan plan.json -o model.slim.onnx
      sfp-onnx compress model.onnx --plan plan.json --data cifar10 -o model.slim.onnx
    """
    speed = opts["target_speedup"] is not None or opts["target_latency_ms"] is not None
    if speed == (opts["target_macs"] is not None) or (
        opts["target_speedup"] is not None and opts["target_latency_ms"] is not None
    ):
        raise click.UsageError(
            "give exactly one of --target-macs, --target-speedup and --target-latency-ms"
        )
    opts["measured"] = measured_sensitivity(model, opts)
    result = _speed_plan(model, opts) if speed else _macs_plan(model, opts)
    if output:
        from sfp_onnx._io import write_json

        write_json(output, result.to_json())
    _show(result)
    if output:
        console.print(f"plan written to {output}; apply it with: sfp-onnx prune {model} --plan "
                      f"{output} -o OUT.onnx")  # fmt: skip


def _macs_plan(model: str, opts: dict):
    with status("planning"):
        return sfp_onnx.make_plan(
            model, target_macs=opts["target_macs"], round_to=opts["round_to"],
            max_rate=opts["max_rate"], criterion=opts["criterion"],
            sensitivity=opts["measured"],
        )  # fmt: skip


def measured_sensitivity(model: str, opts: dict):
    """The ``--sensitivity`` measurement for MODEL (None without the flag), with progress."""
    if not opts["sensitivity"]:
        return None
    from sfp_onnx.cli._options import data_config

    from sfp_onnx.planning import allocation_criterion

    config = sfp_onnx.SensitivityConfig(
        calibration_images=opts["calibration_images"], seed=opts["seed"]
    )
    with Progress(*Progress.get_default_columns(), console=console, transient=True) as bar:
        task = bar.add_task("measuring sensitivity (cuts)", total=None)
        result = sfp_onnx.measure_plan_sensitivity(
            model, data_config(opts), round_to=opts["round_to"], max_rate=opts["max_rate"],
            criterion=allocation_criterion(opts["criterion"]),
            config=config,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )  # fmt: skip
    cuts = sum(len(by) for by in result.rises.values())
    console.print(
        f"sensitivity: {cuts} cuts of {len(result.rises)} groups measured on "
        f"{result.calibration_images} held-back images in {result.seconds:.0f} s "
        f"(whole-network loss {result.base_loss:.4f})"
    )
    return result


def _speed_plan(model: str, opts: dict):
    from sfp_onnx.speed_targets import SpeedSearch, default_cache_dir, plan_for_speed

    search = SpeedSearch(batch=opts["bench_batch"], provider=opts["provider"],
                         seconds=opts["timing_seconds"],
                         cache_dir=opts["cache_dir"] or default_cache_dir())  # fmt: skip
    result, _points = plan_for_speed(
        model, target_speedup=opts["target_speedup"],
        target_latency_ms=opts["target_latency_ms"], round_to=opts["round_to"],
        max_rate=opts["max_rate"], criterion=opts["criterion"], sensitivity=opts["measured"],
        search=search, progress=console.print,
    )  # fmt: skip
    refuse_a_miss(result, opts["strict"])
    return result


def _show(result) -> None:
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
        f"({share:.1%} kept)"
    )
    for line in plan_verdict(result):
        console.print(line)


def plan_verdict(result) -> list[str]:
    """What a plan says about its target: the measured speedup, a miss, or out of reach."""
    lines, measured = [], result.measured
    if measured:
        asked = ", ".join(f"{k} {v:g}" for k, v in result.target.items())
        lines.append(
            f"measured: {measured['speedup']:.2f}x faster ({measured['latency_ms']:.3g} ms vs "
            f"{measured['base_latency_ms']:.3g} ms at batch {measured['batch']}, "
            f"{measured['provider']}); target {asked}"
        )
        if not measured["within_5_percent"]:
            lines.append("the measured speedup misses the target by more than 5%")
    if not result.reached:
        rounded = (result.round_to or 1) > 1
        rounding = f", widths in multiples of {result.round_to}" if rounded else ""
        lines.append(
            f"the target is out of reach: every group is at its floor (--max-rate "
            f"{result.max_rate:g}{rounding}), which keeps "
            f"{result.predicted_macs / result.full_macs:.1%} of the MACs; raise --max-rate"
            + (", lower --round-to" if rounded else "")
            + " or ease the target"
        )
    return lines


def refuse_a_miss(result, strict: bool) -> None:
    """``--strict``: a speed plan more than 5% from its target is an error, raised before
    anything is written or trained."""
    if strict and result.measured and not result.measured["within_5_percent"]:
        from sfp_onnx.errors import UsageError

        raise UsageError(
            f"the best plan runs {result.measured['speedup']:.2f}x faster, more than 5% from "
            "the target (--strict); raise --max-rate or change the target"
        )
