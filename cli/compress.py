"""``sfp-onnx compress``: SFP fine-tuning of an ONNX classifier, written as a smaller exact ONNX."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from sfp_onnx.cli._options import ROUND_TO
from sfp_onnx.cli._render import console, render_report

__all__ = ["compress"]


class _TrainingBars:
    """Renders the training loop's progress events as rich progress bars."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = None
        self.kept = ""

    def __call__(self, event) -> None:
        kind = getattr(event, "kind", "")
        if kind == "batch":
            total = getattr(event, "total", None)
            if self.task is None:
                self.task = self.progress.add_task("", total=total)
            desc = (
                f"epoch {event.epoch} loss {event.loss:.3f} acc {event.accuracy:.1%} "
                f"lr {event.lr:.4f}{self.kept}"
            )
            self.progress.update(self.task, completed=event.step, total=total, description=desc)
        elif kind == "epoch":
            extra = getattr(event, "extra", None) or {}
            if "kept_channels" in extra:
                self.kept = f" kept {extra['kept_channels']}/{extra['channels']}"
            acc = getattr(event, "eval_accuracy", None)
            if acc is None:
                acc = getattr(event, "accuracy", None)
            self.progress.console.print(
                f"epoch {event.epoch}: loss {getattr(event, 'loss', float('nan')):.4f}"
                + (f", test accuracy {acc:.2%}" if acc is not None else "")
                + self.kept
            )
            if self.task is not None:
                self.progress.reset(self.task)
        elif getattr(event, "message", None):
            self.progress.console.print(event.message)


def _floats(value: str | None) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value.replace(",", " ").split())


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the slim model.",
)
@click.option(
    "--rate",
    required=True,
    type=float,
    help="Fraction of each group's channels to prune, in [0, 1).",
)
@click.option(
    "--data",
    "data_name",
    type=click.Choice(["cifar10", "cifar100", "imagefolder"]),
    default="cifar10",
    show_default=True,
    help="Training data. cifar10/cifar100 download through torchvision unless --data-root "
    "holds them.",
)
@click.option(
    "--data-root",
    type=click.Path(),
    help="Dataset folder: an ImageFolder tree with train/ and test/, or torchvision's CIFAR files.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Fine-tuning epochs (SFP prunes at each epoch end).",
)
@click.option(
    "--lr",
    type=float,
    default=0.01,
    show_default=True,
    help="Initial learning rate (SGD, Nesterov momentum 0.9).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option(
    "--lr-schedule", type=click.Choice(["cosine", "step"]), default="cosine", show_default=True
)
@click.option(
    "--criterion",
    type=click.Choice(["l2", "l1", "fpgm", "taylor"]),
    default="l2",
    show_default=True,
    help="Channel importance: L2 norm (SFP), L1 norm, FPGM (geometric median), or taylor "
    "(soft-mask: how much the loss changes per channel, measured on the training batches).",
)
@click.option(
    "--method",
    type=click.Choice(["soft-mask", "sfp-paper"]),
    default="soft-mask",
    show_default=True,
    help="soft-mask: whole channels (filter, bias, norm scale and shift) masked in the forward "
    "pass, re-chosen every --reselect-every steps, frozen for the last --freeze of training. "
    "sfp-paper: the paper's epoch-end zeroing of filter rows (loses accuracy on BN networks).",
)
@click.option(
    "--schedule",
    type=click.Choice(["constant", "asymptotic"]),
    default="asymptotic",
    show_default=True,
    help="Pruning rate over the pruning phase: an exponential ramp to --rate (ASFP) or "
    "--rate from the start (SFP).",
)
@click.option(
    "--reselect-every",
    type=click.IntRange(min=1),
    default=None,
    help="soft-mask: optimizer steps between re-selections of the masks (and at epoch ends "
    "in the pruning phase). Default: 8 selections over the pruning phase.",
)
@click.option(
    "--freeze",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.9,
    show_default=True,
    help="soft-mask: final fraction of the training steps with the masks frozen, so the network "
    "recovers with exactly its final structure.",
)
@click.option(
    "--masked-scale",
    type=click.Choice(["zero", "decay"]),
    default="zero",
    show_default=True,
    help="soft-mask: masked channels are multiplied by 0, or by a factor decaying to 0 over the "
    "pruning phase.",
)
@click.option(
    "--straight-through/--no-straight-through",
    default=False,
    show_default=True,
    help="soft-mask: masked channels still get the full gradient, as if kept (measured to "
    "hurt: the kept layers then train on paths the network does not have).",
)
@click.option(
    "--distill/--no-distill",
    default=True,
    show_default=True,
    help="Distil from MODEL itself (imported once more, frozen): the loss mixes cross entropy "
    "with the KL divergence to its softened outputs. Costs one extra forward pass per step.",
)
@click.option(
    "--distill-weight",
    type=click.FloatRange(0.0, 1.0),
    default=0.5,
    show_default=True,
    help="Share of the loss from the teacher: (1-w)·CE + w·T²·KL.",
)
@click.option(
    "--distill-temperature",
    type=click.FloatRange(min=0.0, min_open=True),
    default=4.0,
    show_default=True,
    help="Temperature T that softens the teacher's and the student's outputs.",
)
@click.option(
    "--teacher",
    "teacher_model",
    type=click.Path(dir_okay=False),
    help="Distil from this ONNX model instead of MODEL (same input size and classes), e.g. "
    "the unpruned original when MODEL was pruned already.",
)
@click.option(
    "--insert-norms/--no-insert-norms",
    default=True,
    show_default=True,
    help="BN-folded exports: train with a BatchNorm after each convolution no norm reads, "
    "folded back exactly before writing.",
)
@click.option(
    "--round-to",
    type=ROUND_TO,
    default="auto",
    show_default=True,
    metavar="K|auto|none",
    help="Keep a multiple of K channels per group. auto: what the target's fast kernels want "
    "(16 on a CPU with AVX-512, else 8; 8 when training on CUDA); none: no rounding.",
)
@click.option(
    "--independent-layers",
    is_flag=True,
    help="Reference-code mode: each layer picks its own filters (union at surgery).",
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    help="Checkpoint folder (default: OUTPUT.work, removed once OUTPUT is written).",
)
@click.option("--resume", is_flag=True, help="Continue the run saved in --workdir.")
@click.option(
    "--train-limit",
    type=click.IntRange(min=1),
    help="Train on a seeded class-balanced subset of N images.",
)
@click.option(
    "--eval-limit",
    type=click.IntRange(min=1),
    help="Evaluate on a seeded class-balanced subset of N images.",
)
@click.option("--mean", help="Normalisation mean, 3 values (default: the dataset's preset).")
@click.option("--std", help="Normalisation std, 3 values (default: the dataset's preset).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Data loader processes.",
)
@click.option(
    "--save-masked", type=click.Path(dir_okay=False), help="Also write the zeroed, unsliced model."
)
@click.option(
    "--report", type=click.Path(dir_okay=False), help="Also write the report as JSON here."
)
@click.option(
    "--bn-recalibration",
    type=click.IntRange(min=0),
    default=None,
    help="Training batches that re-estimate BatchNorm statistics after each epoch's masks "
    "(0: off). Default: 50 with sfp-paper, whose zeroing changes them; 0 with soft-mask, whose "
    "statistics follow the masks during training.",
)
@click.option("--no-bench", is_flag=True, help="Skip the onnxruntime latency measurement.")
@click.option(
    "--external-data",
    is_flag=True,
    default=None,
    help="Write the weights to OUTPUT.data beside the model (automatic above 1.8 GB).",
)
def compress(
    model, output, rate, data_name, data_root, epochs, lr, batch_size, weight_decay,
    lr_schedule, criterion, method, schedule, reselect_every, freeze, masked_scale,
    straight_through, distill, distill_weight, distill_temperature, teacher_model,
    insert_norms, round_to, independent_layers, device, workdir, resume, train_limit,
    eval_limit, mean, std, seed, workers, save_masked, report, bn_recalibration, no_bench,
    external_data,
) -> None:  # fmt: skip
    """Fine-tune MODEL with Soft Filter Pruning and write a smaller, exact ONNX.

    \b
    1. measures MODEL's accuracy in onnxruntime on the test set;
    2. imports it into PyTorch and checks the import against onnxruntime;
    3. fine-tunes for --epochs; at each epoch end zeroes the lowest-importance channels of
       every prunable group (they may grow back next epoch);
    4. removes the channels zeroed at the end, checks OUTPUT against the masked model on
       real images, and measures accuracy, MACs, parameters and latency before and after.
    Checkpoints go to --workdir every epoch; Ctrl-C stops cleanly and --resume continues.
    The default workdir (OUTPUT.work) is removed once OUTPUT is written; one you name is kept.
    """
    from sfp_onnx.data.datasets import DataConfig
    from sfp_onnx.pipeline import CompressOptions
    from sfp_onnx.pipeline import compress as run_compress
    from sfp_onnx.training.objectives import DistillConfig
    from sfp_onnx.training.sfp import SfpConfig
    from sfp_onnx.training.train import TrainConfig

    data = DataConfig(
        name=data_name, root=data_root, mean=_floats(mean), std=_floats(std),
        train_limit=train_limit, eval_limit=eval_limit, seed=seed,
    )  # fmt: skip
    sfp = SfpConfig(
        rate=rate, method=method, criterion=criterion, schedule=schedule, round_to=round_to,
        reselect_every=reselect_every, freeze=freeze, masked_scale=masked_scale,
        straight_through=straight_through, independent_layers=independent_layers,
        bn_recalibration=bn_recalibration,
    )  # fmt: skip
    training = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        schedule=lr_schedule, device=device, seed=seed, workers=workers,
        insert_norms=insert_norms,
    )  # fmt: skip
    teacher = DistillConfig(enabled=distill, weight=distill_weight, temperature=distill_temperature)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    ) as progress:  # fmt: skip
        options = CompressOptions(
            workdir=Path(workdir) if workdir else None, resume=resume, save_masked=save_masked,
            report=report, bench=not no_bench, progress=_TrainingBars(progress),
            external_data=external_data,
        )  # fmt: skip
        result = run_compress(
            model, output, sfp=sfp, data=data, training=training, distill=teacher, options=options
        )
    render_report(result)
    accuracy = result.extra["accuracy"]
    console.print(
        f"top-1 accuracy: {accuracy['before']:.2%} -> {accuracy['after']:.2%} "
        f"on {result.extra['eval_samples']} test images"
    )
    if "latency_ms" in result.extra:
        lat = result.extra["latency_ms"]
        console.print(
            f"onnxruntime latency (batch 1, p50): {lat['before']:.2f} ms -> {lat['after']:.2f} ms "
            f"({lat['before'] / lat['after']:.2f}x)"
        )
    if result.extra["training"]["workdir"]:
        # soft_wrap: a long path stays on one line, to be copied as it is
        console.print(f"checkpoints kept in {result.extra['training']['workdir']}", soft_wrap=True)
