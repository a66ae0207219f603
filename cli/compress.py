"""``sfp-onnx compress``: fine-tune an ONNX classifier while soft-pruning it, write it smaller.

Maps the options to the library's configs (:class:`~sfp_onnx.training.sfp.SfpConfig`,
:class:`~sfp_onnx.data.datasets.DataConfig`, :class:`~sfp_onnx.training.train.TrainConfig`,
:class:`~sfp_onnx.training.objectives.DistillConfig`,
:class:`~sfp_onnx.pipeline.CompressOptions`), runs :func:`sfp_onnx.pipeline.compress` with a
live progress line, and prints the summary. No pruning logic lives here.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click
from sfp_onnx.cli._options import (
    DATA_OPTIONS,
    NUMBER_OR_AUTO,
    SENSITIVITY_OPTIONS,
    data_config,
    option_group,
    round_to_option,
)
from sfp_onnx.cli._progress import CompressProgress
from sfp_onnx.cli._render import console, render_report

__all__ = ["compress"]


_TRAINING = option_group(
    click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True,
                 help="Fine-tuning epochs."),
    click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=0.03,
                 show_default=True, help="Peak learning rate (SGD, Nesterov momentum 0.9); "
                 "a run of a few hundred steps does better lower (0.02)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
                 help="Images per optimizer step."),
    click.option("--weight-decay", type=click.FloatRange(min=0.0), default=5e-4,
                 show_default=True, help="L2 penalty on every parameter."),
    click.option("--lr-schedule", type=click.Choice(["cosine", "step"]), default="cosine",
                 show_default=True,
                 help="cosine: from --lr to 0; step: x0.1 at 50% and 75% of the epochs."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                 show_default=True, help="auto: CUDA (with bf16 autocast) when available."),
    click.option("--eval-every", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Validate every N epochs (and after the last)."),
    click.option("--sync-bn", is_flag=True,
                 help="Under torchrun on CUDA: BatchNorm statistics over all GPUs' batches "
                 "(SyncBatchNorm), for small per-GPU batches."),
)  # fmt: skip
_PRUNING = option_group(
    click.option("--method", type=click.Choice(["soft-mask", "sfp-paper"]), default="soft-mask",
                 show_default=True,
                 help="soft-mask: whole channels masked in the forward pass, re-chosen during "
                 "the pruning phase, then frozen. sfp-paper: the paper's epoch-end zeroing of "
                 "filter rows (loses accuracy on BatchNorm networks)."),
    click.option("--criterion", type=click.Choice(["l2", "l1", "fpgm", "taylor"]), default="l2",
                 show_default=True,
                 help="Channel scores: L2 or L1 norm of the filters (a following norm folded "
                 "in), FPGM, or taylor (soft-mask: dL/dmask measured on training batches)."),
    click.option("--schedule", type=click.Choice(["constant", "asymptotic"]),
                 default="asymptotic", show_default=True,
                 help="Rate over the pruning phase: an exponential ramp to --rate (ASFP), or "
                 "--rate from the start (SFP)."),
    click.option("--freeze", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.9,
                 show_default=True,
                 help="soft-mask: final share of the steps with the masks frozen, so the "
                 "network recovers with exactly its final structure."),
    click.option("--reselect-every", type=click.IntRange(min=1), default=None,
                 help="soft-mask: steps between re-selections of the masks in the pruning "
                 "phase (and at its epoch ends). [default: 8 selections over the phase]"),
    click.option("--reselect-margin", type=click.FloatRange(min=0.0), default=0.1,
                 show_default=True,
                 help="soft-mask: hysteresis of a re-selection: a masked channel comes back "
                 "only if its score beats a kept channel's by this share (0.1: by 10%)."),
    click.option("--masked-scale", type=click.Choice(["zero", "decay"]), default="zero",
                 show_default=True,
                 help="soft-mask: masked channels x0, or x a factor decaying to 0 over the "
                 "pruning phase."),
    click.option("--straight-through/--no-straight-through", default=False, show_default=True,
                 help="soft-mask: masked channels get the full gradient as if kept (measured "
                 "to hurt: kept layers then train on paths the network does not have)."),
    round_to_option(
                 help="Keep a multiple of K channels per group. auto: what the target's fast "
                 "kernels want (16 on a CPU with AVX-512, else 8; 8 when training on CUDA)."),
    click.option("--independent-layers", is_flag=True,
                 help="sfp-paper only: each layer picks its own filters (union at surgery)."),
    click.option("--bn-recalibration", type=click.IntRange(min=0), default=None,
                 help="Batches that re-estimate BatchNorm statistics at each epoch end (0: "
                 "off). [default: 50 with sfp-paper, 0 with soft-mask]"),
    click.option("--insert-norms/--no-insert-norms", default=True, show_default=True,
                 help="BN-folded exports: train with a BatchNorm after each convolution no "
                 "norm reads, folded back exactly before writing."),
)  # fmt: skip
_DISTILL = option_group(
    click.option("--distill/--no-distill", default=True, show_default=True,
                 help="Distil from MODEL itself (imported again, frozen): the loss mixes cross "
                 "entropy with the KL divergence to its softened outputs (and, with "
                 "--distill-features, pulls the kept channels toward MODEL's). Costs one extra "
                 "forward pass per step (about a third more time on a CPU)."),
    click.option("--distill-weight", type=click.FloatRange(0.0, 1.0), default=0.5,
                 show_default=True, help="Share of the loss from the teacher: (1-w)CE + wT²KL."),
    click.option("--distill-temperature", type=click.FloatRange(min=0.0, min_open=True),
                 default=4.0, show_default=True,
                 help="Temperature T that softens both outputs."),
    click.option("--distill-features", type=NUMBER_OR_AUTO, default="auto", show_default=True,
                 metavar="W|auto",
                 help="Also pull every kept channel toward MODEL's same channel where a layer "
                 "reads it: the weight of the mean relative squared gap (soft-mask method, "
                 "MODEL as the teacher; 0: off). auto: 100 for runs of up to 300 optimizer "
                 "steps, falling linearly to 0 at 600 (measured: +1.2 to +2.2 points at "
                 "157-237 steps on three networks, neutral at 468 and 782, -0.5 at 1,560)."),
    click.option("--distill-features-decay", default=None, metavar="F",
                 type=click.FloatRange(0.0, 1.0, min_open=True),
                 help="The --distill-features weight falls linearly to 0 over the first F of "
                 "the steps. [default: constant]"),
    click.option("--teacher", "teacher_model", type=click.Path(dir_okay=False),
                 help="Distil from this ONNX model instead (same input size and classes), e.g. "
                 "the unpruned original when MODEL was pruned already."),
)  # fmt: skip
_OUTPUTS = option_group(
    click.option("--workdir", type=click.Path(file_okay=False),
                 help="Checkpoint and metrics.csv folder, written every epoch. [default: "
                 "OUTPUT.work, removed once OUTPUT is written; a folder you name is kept]"),
    click.option("--resume", is_flag=True, help="Continue the run saved in --workdir."),
    click.option("--save-masked", type=click.Path(dir_okay=False),
                 help="Also write the zeroed, unsliced model (the exactness reference)."),
    click.option("--report", type=click.Path(dir_okay=False),
                 help="Also write the report JSON (every setting, figure and epoch) here."),
    click.option("--report-dir", type=click.Path(file_okay=False),
                 help="Write report.json and PNG plots (training curves, layer widths, "
                 "accuracy and latency before/after) into this folder."),
    click.option("--external-data", is_flag=True, default=None,
                 help="Write the weights to OUTPUT.data beside the model (automatic above "
                 "1.8 GB)."),
    click.option("--bench/--no-bench", default=True, show_default=True,
                 help="Measure onnxruntime latency before/after (interleaved, as `bench`)."),
    click.option("--bench-batch", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Batch size of the latency measurement."),
    click.option("--bench-runs", type=click.IntRange(min=1), default=50, show_default=True,
                 help="Timed runs per model of the latency measurement (as `bench --runs`)."),
    click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
                 default="auto", show_default=True,
                 help="onnxruntime provider of the latency measurement."),
)  # fmt: skip


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the slim model.")  # fmt: skip
@click.option("--rate", type=float,
              help="Fraction of each group's channels to remove, in [0, 1).")  # fmt: skip
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False),
              help="Instead of --rate: per-group widths from `sfp-onnx plan` (each group "
              "ramps to its own width).")  # fmt: skip
@click.option("--target-macs", type=float,
              help="Instead of --rate: plan per-group widths that keep this fraction of the "
              "MACs (as `sfp-onnx plan --target-macs`), then train to them.")  # fmt: skip
@click.option("--target-speedup", type=float,
              help="Instead of --rate: plan widths whose file runs this many times faster "
              "(timed as `plan --target-speedup`, at --bench-batch).")  # fmt: skip
@click.option("--target-latency-ms", type=float,
              help="Instead of --rate: plan widths whose file runs under this (ms).")  # fmt: skip
@click.option("--max-rate", type=float, default=0.7, show_default=True,
              help="With a target: no group loses more than this fraction.")  # fmt: skip
@click.option("--timing-seconds", type=click.FloatRange(min=0.5), default=10.0,
              show_default=True,
              help="--target-speedup/--target-latency-ms: seconds each candidate is timed "
              "per round (as `plan --timing-seconds`).")  # fmt: skip
@click.option("--strict", is_flag=True,
              help="Speed targets: stop before training when the best plan's measured "
              "speedup misses the target by more than 5%.")  # fmt: skip
@DATA_OPTIONS
@SENSITIVITY_OPTIONS
@_TRAINING
@_PRUNING
@_DISTILL
@_OUTPUTS
def compress(model: str, output: str, **opts) -> None:
    """Fine-tune MODEL while soft-pruning it, and write a smaller, exact ONNX to OUTPUT.

    \b
    1. measures MODEL's accuracy in onnxruntime on the test set;
    2. imports it into PyTorch (checked against onnxruntime);
    3. fine-tunes for --epochs with whole channels masked in the forward pass: the masks
       are re-chosen during the pruning phase, then frozen for the last --freeze of the
       steps; the input model is the teacher (--distill);
    4. removes the masked channels, checks OUTPUT against the masked model on real images
       (nothing is written if it is not exact), and measures accuracy, MACs, parameters
       and latency before and after.
    Checkpoints and metrics.csv go to --workdir every epoch; Ctrl-C or SIGTERM stops
    cleanly (exit 130) and --resume continues, with any number of processes.
    Several GPUs (or CPU processes): start it with torchrun; --batch-size is split
    over the processes, and rank 0 alone prints and writes.

    \b
    Examples:
      sfp-onnx compress model.onnx --rate 0.3 --data cifar10 -o model.slim.onnx
      sfp-onnx compress model.onnx --rate 0.4 --data imagefolder --data-root ./images \\
          --epochs 20 --lr 0.005 --report-dir report/ -o model.slim.onnx
      sfp-onnx compress model.onnx --rate 0.3 --data cifar10 --workdir run1 --resume -o s.onnx
      sfp-onnx compress model.onnx --target-macs 0.5 --data cifar10 -o model.slim.onnx
      torchrun --nproc-per-node 4 -m sfp_onnx.cli compress model.onnx --rate 0.3 \\
          --data imagefolder --data-root ./images --batch-size 512 -o model.slim.onnx
    """
    from sfp_onnx.pipeline import compress as run_compress
    from sfp_onnx.training.distributed import environment_rank

    configs = _configs(model, opts)
    if environment_rank() != 0:  # under torchrun: trains along, rank 0 reports
        run_compress(model, output, **configs(None))
        return
    with CompressProgress(console, opts["epochs"]) as progress:
        result = run_compress(model, output, **configs(progress))
    _summary(result)


def _configs(model: str, opts: dict):
    """The library's configs from the options (validated as they are built)."""
    from dataclasses import replace

    from sfp_onnx.pipeline import CompressOptions
    from sfp_onnx.training.objectives import DistillConfig
    from sfp_onnx.training.sfp import SfpConfig
    from sfp_onnx.training.train import TrainConfig

    data = data_config(opts)
    plan = _plan(model, opts)
    sfp = SfpConfig(**{**{k: opts[k] for k in _SFP_KEYS}, "rate": opts["rate"] or 0.0})
    if plan is not None:  # the plan's widths, its rounding; rate: its share, for the record
        sfp = replace(sfp, plan=plan, rate=plan.removed_share, round_to=plan.round_to)
    training = TrainConfig(
        epochs=opts["epochs"], batch_size=opts["batch_size"], lr=opts["lr"],
        weight_decay=opts["weight_decay"], schedule=opts["lr_schedule"], device=opts["device"],
        seed=opts["seed"], workers=opts["workers"], eval_every=opts["eval_every"],
        insert_norms=opts["insert_norms"], sync_batchnorm=opts["sync_bn"],
    )  # fmt: skip
    distill = DistillConfig(
        enabled=opts["distill"], weight=opts["distill_weight"],
        temperature=opts["distill_temperature"], teacher=opts["teacher_model"],
        features=opts["distill_features"], features_decay=opts["distill_features_decay"],
    )  # fmt: skip

    def with_progress(progress) -> dict:
        options = CompressOptions(
            workdir=Path(opts["workdir"]) if opts["workdir"] else None, resume=opts["resume"],
            save_masked=opts["save_masked"], report=opts["report"],
            report_dir=opts["report_dir"], bench=opts["bench"],
            bench_batch=opts["bench_batch"], bench_runs=opts["bench_runs"],
            provider=opts["provider"],
            external_data=opts["external_data"], command_line=shlex.join(sys.argv),
            progress=progress,
        )  # fmt: skip
        return {"sfp": sfp, "data": data, "training": training, "distill": distill,
                "options": options}  # fmt: skip

    return with_progress


def _plan(model: str, opts: dict):
    """The plan a target asks for (timed, or weighed by --sensitivity), or None (--rate)."""
    from sfp_onnx.cli.plan import measured_sensitivity, plan_verdict, refuse_a_miss

    from sfp_onnx.api import resolve_plan
    from sfp_onnx.speed_targets import default_cache_dir

    speed_target = opts["target_speedup"] is not None or opts["target_latency_ms"] is not None
    target = speed_target or opts["target_macs"] is not None
    if opts["sensitivity"] and not target:
        raise click.UsageError("--sensitivity weighs the widths of a target; give --target-macs, "
                               "--target-speedup or --target-latency-ms")  # fmt: skip
    opts["sensitivity"] = target and opts["sensitivity"] is not False  # on for a target
    if (speed_target or opts["sensitivity"]) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise click.UsageError(  # each rank would time or measure its own plan
            "under torchrun, make the plan first (`sfp-onnx plan --target-speedup ... "
            "--sensitivity --data ... -o plan.json`) and pass --plan plan.json"
        )
    provider = "cpu" if opts["provider"] == "auto" else opts["provider"]
    exactly_one = target and opts["rate"] is None and not opts["plan_path"]
    plan = resolve_plan(
        model, rate=opts["rate"], plan=opts["plan_path"], target_macs=opts["target_macs"],
        target_speedup=opts["target_speedup"], target_latency_ms=opts["target_latency_ms"],
        speed={"round_to": opts["round_to"], "max_rate": opts["max_rate"],
               "criterion": opts["criterion"], "batch": opts["bench_batch"],
               "sensitivity": measured_sensitivity(model, opts) if exactly_one else None,
               "provider": provider, "cache_dir": default_cache_dir(),
               "seconds": opts["timing_seconds"],
               "progress": console.print},
    )  # fmt: skip
    if plan is not None:
        refuse_a_miss(plan, opts["strict"])
        for line in plan_verdict(plan):
            console.print(line)
    return plan


_SFP_KEYS = (
    "rate", "method", "criterion", "schedule", "freeze", "reselect_every", "reselect_margin",
    "masked_scale", "straight_through", "round_to", "independent_layers", "bn_recalibration",
)  # fmt: skip


def _summary(result) -> None:
    render_report(result)
    extra = result.extra
    accuracy = extra["accuracy"]
    console.print(
        f"top-1 accuracy (onnxruntime, {extra['eval_samples']} test images): "
        f"{accuracy['before']:.2%} -> {accuracy['after']:.2%}"
    )
    if "latency_ms" in extra:
        lat = extra["latency_ms"]
        console.print(
            f"latency (onnxruntime {lat['provider']}, batch {lat['batch_size']}, p50 of "
            f"{lat['runs']} interleaved runs): {lat['before']:.2f} ms -> {lat['after']:.2f} ms "
            f"({lat['before'] / lat['after']:.2f}x)"
        )
    plan = result.settings.get("pruning", {}).get("plan") or {}
    if plan.get("measured") and "latency_ms" in extra:
        _speed_target_lines(plan, extra["latency_ms"])
    settings = result.settings
    if settings.get("outputs", {}).get("report_dir"):
        console.print(f"report and plots in {settings['outputs']['report_dir']}", soft_wrap=True)
    if extra["training"]["workdir"]:
        # soft_wrap: a long path stays on one line, to be copied as it is
        console.print(f"checkpoints kept in {extra['training']['workdir']}", soft_wrap=True)


def _speed_target_lines(plan: dict, latency: dict) -> None:
    """The target beside the speed the search saw and the speed of the file written."""
    now = latency["before"] / latency["after"]
    if "speedup" in plan["target"]:
        goal, asked = plan["target"]["speedup"], f"{plan['target']['speedup']:g}x"
    else:  # a latency target, as a speedup over the original timed just now
        goal = latency["before"] / plan["target"]["latency_ms"]
        asked = f"{plan['target']['latency_ms']:g} ms"
    console.print(
        f"speed target {asked}: {plan['measured']['speedup']:.2f}x when planned, {now:.2f}x "
        f"measured now on the file written (batch {latency['batch_size']})"
    )
    if abs(now / goal - 1) > 0.05:
        console.print(f"the file written misses the target by {now / goal - 1:+.1%} (over 5%)")
