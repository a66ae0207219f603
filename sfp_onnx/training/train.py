"""Training: the fine-tuning loop, its learning-rate schedule, when to checkpoint and resume.

This module owns one thing: running SGD epochs over a torch module, reproducibly. Each epoch
is, in order: lr per step, forward, the objective's loss, backward, step, every hook's
``after_step``; then every hook's ``epoch_end`` (soft pruning re-selects its masks there),
evaluation, checkpoint. A checkpoint holds what a fresh process needs to continue
bit-identically (weights, optimizer, RNG states, history, the hooks' states) plus the settings
that must match to continue. Ctrl-C or SIGTERM stops at the last checkpoint.

Under torchrun the same loop runs on every rank: the module wrapped in DDP, each rank on its
share of every batch (``batch_size`` is the global batch, so a run resumes with any number of
processes), and only rank 0 evaluating, saving and reporting (:mod:`sfp_onnx.training.distributed`).

What it leaves to others: what rides on the loop (hooks, :mod:`sfp_onnx.training.hooks`),
the loss (:mod:`sfp_onnx.training.objectives`), datasets and loaders
(:mod:`sfp_onnx.data.datasets`), accuracy counting (:mod:`sfp_onnx.runtime.evaluate`), the
checkpoint file and RNG capture (:mod:`sfp_onnx.training.checkpoint`), the epoch records,
metrics.csv and the divergence watch (:mod:`sfp_onnx.training.metrics`), interrupts
(:mod:`sfp_onnx.training.interrupts`), and showing progress (the CLI, through ``on_progress``
events).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sfp_onnx.data.loaders import create_loader
from sfp_onnx.errors import DataError, TrainingDiverged, UsageError
from sfp_onnx.runtime.evaluate import evaluate_torch
from sfp_onnx.training import distributed
from sfp_onnx.training.checkpoint import (
    CHECKPOINT,
    checkpoint_path,
    open_checkpoint,
    plain,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from sfp_onnx.training.distributed import Ranks
from sfp_onnx.training.hooks import TrainingHook
from sfp_onnx.training.interrupts import (
    interrupted,
    last_checkpoint,
    stop_point,
    stop_was_requested,
    stops_at_safe_points,
)
from sfp_onnx.training.metrics import METRICS, EpochRecord, LossWatch, write_metrics
from sfp_onnx.training.objectives import CrossEntropy

__all__ = [
    "CHECKPOINT",
    "DEVICES",
    "LR_SCHEDULES",
    "METRICS",
    "EpochRecord",
    "ProgressEvent",
    "TrainConfig",
    "TrainResult",
    "learning_rate",
    "resolve_device",
    "steps_per_epoch",
    "train",
    "write_metrics",
]

DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("cosine", "step")
BATCH_EVENTS_EVERY = 10  # steps between batch events (each one reads the loss off the GPU)
# TrainConfig fields on how a run executes, not what it computes: a resumed run may change them.
_EXECUTION_FIELDS = ("device", "amp", "channels_last", "workers", "eval_every", "sync_batchnorm")


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune; validated on construction (raises :class:`UsageError`)."""

    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # images per optimizer step (over all processes of a DDP run)
    # peak learning rate: best of 0.01 / 0.03 / 0.05 for pruned ResNet-20s fine-tuned 4 epochs
    # on CIFAR-10 (sfp_design.md); a few hundred steps want less (0.02); from scratch ~0.1
    lr: float = 0.03
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum, as in the SFP reference recipe
    weight_decay: float = 5e-4  # L2 penalty on every parameter
    schedule: str = "cosine"  # "cosine" | "step" (x0.1 at 50% and 75% of epochs)
    warmup_epochs: float = 0.0  # linear warmup from ~0 to lr, in (fractional) epochs
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA (fp16 + grad scaling without bf16); CPU: fp32
    channels_last: bool = True  # NHWC memory format on CUDA (faster convolutions)
    seed: int = 0  # seeds shuffling, augmentation and the global RNGs at a fresh start
    workers: int = 2  # data-loading processes; 0 loads in this process
    eval_every: int = 1  # evaluate every N epochs (and always after the last one)
    # BN-folded exports: train with a BatchNorm after each un-normed conv, folded back after
    insert_norms: bool = True
    sync_batchnorm: bool = False  # DDP on CUDA: BatchNorm statistics over every rank's batch

    def __post_init__(self) -> None:
        for name, (valid, wanted) in _LIMITS.items():
            value = getattr(self, name)
            if not valid(value):
                raise UsageError(f"training option {name} is {value!r}; give {wanted}")
        if self.warmup_epochs >= self.epochs:
            raise UsageError(
                f"warmup of {self.warmup_epochs} epochs is not shorter than the "
                f"{self.epochs} epochs of training; shorten the warmup"
            )
        if self.nesterov and self.momentum == 0:
            raise UsageError("Nesterov momentum needs a momentum > 0; set momentum or nesterov off")


_LIMITS: dict[str, tuple[Callable[[object], bool], str]] = {
    "epochs": (lambda v: v >= 1, "1 or more"),
    "batch_size": (lambda v: v >= 1, "1 or more"),
    "lr": (lambda v: v > 0, "a value > 0"),
    "momentum": (lambda v: 0 <= v < 1, "a value in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "a value >= 0"),
    "schedule": (lambda v: v in LR_SCHEDULES, "one of " + ", ".join(LR_SCHEDULES)),
    "warmup_epochs": (lambda v: v >= 0, "a value >= 0"),
    "device": (lambda v: v in DEVICES, "one of " + ", ".join(DEVICES)),
    "workers": (lambda v: v >= 0, "0 (load in-process) or more"),
    "eval_every": (lambda v: v >= 1, "1 or more"),
}


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`train`.

    Attributes:
        epochs: one record per epoch of the whole run, resumed epochs included.
        seconds: wall time of this call.
        resumed_from: the epoch the run continued after, or None for a fresh start.
        device: the device trained on (rank 0's in a distributed run).
        processes: how many processes trained together (DDP ranks; 1 without torchrun).
        backend: their torch.distributed backend (nccl, gloo), None for one process.
    """

    epochs: tuple[EpochRecord, ...]
    seconds: float
    resumed_from: int | None
    device: str
    processes: int = 1
    backend: str | None = None


@dataclass(frozen=True)
class ProgressEvent:
    """A progress report for a UI; the library itself never prints.

    ``batch``: step/total are batches of the epoch; loss/accuracy are the epoch's running
    means. ``eval``: step/total are images evaluated. ``epoch``: an epoch is done and saved;
    step/total are epochs. ``stage``: a stretch of work begins, described by ``message`` (a UI
    shows it until the next event). ``note``: a one-line ``message`` to keep on screen.
    """

    kind: str  # "batch" | "eval" | "epoch" | "stage" | "note"
    epoch: int = 0  # 1-based epoch the event belongs to (0: before training)
    step: int = 0  # batches, images or epochs done
    total: int = 0  # batches, images or epochs in all
    loss: float | None = None  # running mean training loss of the epoch
    accuracy: float | None = None  # running training top-1 accuracy of the epoch
    lr: float | None = None  # learning rate of the latest step
    eval_accuracy: float | None = None  # epoch: evaluation top-1 (None when not evaluated)
    extra: dict = field(default_factory=dict)  # epoch: what the hooks' epoch_end returned
    message: str | None = None  # note: one line for the user


def resolve_device(name: str) -> torch.device:
    """The torch device for ``auto``, ``cpu`` or ``cuda`` (auto: cuda when available).

    Raises:
        UsageError: an unknown name, or ``cuda`` without a GPU PyTorch can use.
    """
    if name not in DEVICES:
        raise UsageError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda was asked for but PyTorch sees no CUDA GPU; use cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based, counted over the whole run)."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = config.epochs * steps_per_epoch
    # 1) linear warmup: lr/warmup at the first step, the full lr at the end of the warmup
    if step < warmup:
        return config.lr * (step + 1) / warmup
    # 2) step: x0.1 once half of the epochs are done, x0.01 once three quarters are
    if config.schedule == "step":
        done = step // steps_per_epoch
        return config.lr * 0.1 ** sum(done >= f * config.epochs for f in (0.5, 0.75))
    # 3) cosine: from lr right after the warmup down to 0 at the end of the last epoch
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch (the last partial batch is dropped when there are several)."""
    return images // batch_size if images > batch_size else 1


def train(
    module: torch.nn.Module,
    train_set: Dataset,
    eval_set: Dataset | None,
    config: TrainConfig,
    *,
    workdir: str | os.PathLike,
    resume: bool = False,
    hooks: Sequence[TrainingHook] = (),
    objective: torch.nn.Module | None = None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    settings: Mapping | None = None,
) -> TrainResult:
    """Fine-tune ``module`` in place with SGD, checkpointing every epoch.

    Each epoch: train (every hook's ``after_step`` after each step), every hook's
    ``epoch_end``, evaluate, save ``workdir/checkpoint.pt``. The module is left on the
    training device. A fresh start seeds torch's, numpy's and Python's global RNGs with
    ``config.seed``; a resumed run restores them and the hooks' states, so with a fixed seed
    on CPU an interrupted and resumed run ends bit-identical to an uninterrupted one.

    Args:
        module: a classifier mapping ``(N, C, H, W)`` images to ``(N, classes)`` logits.
        train_set: yields ``(image, label)`` pairs, with augmentation if any.
        eval_set: evaluation pairs, or None to skip evaluation.
        config: optimizer, schedule and execution settings.
        workdir: folder for ``checkpoint.pt`` (created if missing).
        resume: continue the run saved in ``workdir``; without a checkpoint start fresh.
        hooks: pieces called at the loop's named points (:class:`TrainingHook`), in order.
        objective: ``objective(logits, images, targets) -> loss`` (default: cross entropy);
            an ``nn.Module``, moved to the training device.
        on_progress: receives :class:`ProgressEvent` reports.
        settings: the caller's settings that must match for ``resume`` (e.g. the SFP rate).

    Raises:
        UsageError: a checkpoint exists without ``resume``, or holds other settings.
        TrainingInterrupted: Ctrl-C or SIGTERM; the last completed epoch stays saved.
    """
    started = time.perf_counter()
    if len(train_set) == 0:
        raise DataError("the training set has no images; check the data root")
    ranks = distributed.join(config.device)  # the group a caller opened, or torchrun's
    emit = (on_progress or _ignore) if ranks.is_main else _ignore
    settings = plain(settings or {})
    device = _rank_device(resolve_device(config.device), ranks, config.batch_size)
    path = checkpoint_path(workdir)
    checkpoint = open_checkpoint(
        path, resume, asdict(config), settings, execution=_EXECUTION_FIELDS,
        note=lambda message: emit(ProgressEvent("note", message=message)),
    )  # fmt: skip
    run = _create_run(module, config, device, ranks, emit, objective or CrossEntropy(), hooks)
    history, done = _restore(run, checkpoint, path) if checkpoint else _fresh_start(config.seed)
    run.forward = _data_parallel(run)  # after the restore: DDP starts from rank 0's state
    for hook in hooks:
        hook.start(steps_per_epoch(len(train_set), config.batch_size), config.epochs)
    if done < config.epochs:
        emit(ProgressEvent("note", done, message=_start_note(run, done, train_set)))
    with stops_at_safe_points():
        for epoch in range(done + 1, config.epochs + 1):
            try:
                stop_point()  # a stop asked for during the last save or epoch-end hooks
                record = _run_epoch(run, train_set, eval_set, epoch)
                _save(run, path, [*history, record], settings)
            except KeyboardInterrupt:  # epoch - 1 is the last one saved (0: none yet)
                raise interrupted(epoch, epoch - 1, path) from None
            except TrainingDiverged as exc:
                raise TrainingDiverged(f"{exc}; {last_checkpoint(epoch - 1, path)}") from None
            except RuntimeError:  # a collective failed: did another rank stop at this interrupt?
                if not (ranks.enabled and stop_was_requested()):
                    raise
                raise interrupted(epoch, epoch - 1, path) from None
            history.append(record)
            emit(_epoch_event(record, config.epochs))
        stop_point()  # asked for after the last step: training is done and saved
    distributed.restore_batchnorm(run.synced_norms)
    module.to(memory_format=torch.contiguous_format)
    resumed_from = checkpoint["epoch"] if checkpoint else None
    seconds = time.perf_counter() - started
    return TrainResult(
        tuple(history), seconds, resumed_from, str(device), ranks.world, ranks.backend
    )


def _rank_device(device: torch.device, ranks: Ranks, batch_size: int) -> torch.device:
    """This rank's device (its local GPU under torchrun); checks the batch splits evenly."""
    if not ranks.enabled:
        return device
    if batch_size % ranks.world:
        raise UsageError(
            f"batch size {batch_size} does not split evenly over {ranks.world} processes; "
            f"give a multiple of {ranks.world}"
        )
    return torch.device("cuda", ranks.local_rank) if device.type == "cuda" else device


def _data_parallel(run: _Run) -> torch.nn.Module:
    """The module as the training steps call it: wrapped in DDP when several ranks train."""
    if not run.ranks.enabled:
        return run.module
    from torch.nn.parallel import DistributedDataParallel

    cuda = run.device.type == "cuda"
    # BatchNorm buffers follow rank 0's at every forward (DDP's default)
    return DistributedDataParallel(run.module, device_ids=[run.device.index] if cuda else None)


@dataclass
class _Run:
    """The objects one run works on; a checkpoint saves the module, optimizer, scaler, hooks."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # scales fp16 losses; a pass-through when disabled
    objective: torch.nn.Module  # (logits, images, targets) -> loss
    hooks: Sequence[TrainingHook]  # called at the loop's named points; saved in checkpoints
    config: TrainConfig
    device: torch.device
    autocast: torch.dtype | None  # autocast dtype, None for plain float32
    memory_format: torch.memory_format  # of the model and its input batches
    emit: Callable[[ProgressEvent], None]
    loss_watch: LossWatch  # stops a diverging run
    ranks: Ranks  # this process among those training together
    forward: torch.nn.Module  # what a step calls: the module, or its DDP wrapper
    synced_norms: list  # BatchNorms swapped for SyncBatchNorm (undone after training)


def _create_run(
    module: torch.nn.Module,
    config: TrainConfig,
    device: torch.device,
    ranks: Ranks,
    emit: Callable[[ProgressEvent], None],
    objective: torch.nn.Module,
    hooks: Sequence[TrainingHook],
) -> _Run:
    """Move the module to ``device`` and build its optimizer and precision settings."""
    cuda = device.type == "cuda"
    autocast = None
    if cuda and config.amp:
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    memory_format = torch.channels_last if cuda and config.channels_last else torch.preserve_format
    module.to(device=device, memory_format=memory_format)
    synced = distributed.use_sync_batchnorm(module, device) if config.sync_batchnorm else []
    objective.to(device=device, memory_format=memory_format)
    optimizer = torch.optim.SGD(
        module.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
    return _Run(
        module, optimizer, scaler, objective, hooks, config, device, autocast, memory_format,
        emit, LossWatch(config.lr), ranks, module, synced,
    )  # fmt: skip


def _run_epoch(run: _Run, train_set: Dataset, eval_set: Dataset | None, epoch: int) -> EpochRecord:
    """Train one epoch, call the hooks' epoch ends, evaluate if due; returns the record."""
    started = time.perf_counter()
    loss, accuracy, lr = _train_epoch(run, train_set, epoch)
    labels = [hook.label for hook in run.hooks if hook.label]
    if labels:
        run.emit(ProgressEvent("stage", epoch, message=f"epoch {epoch}: {', '.join(labels)}"))
    extra: dict = {}
    for hook in run.hooks:
        extra.update(plain(hook.epoch_end(epoch) or {}))
    config = run.config
    due = eval_set is not None and (epoch % config.eval_every == 0 or epoch == config.epochs)
    due = due and run.ranks.is_main  # the other ranks wait for it at the end of _save
    if due:
        message = f"epoch {epoch}: validating on {len(eval_set)} images"
        run.emit(ProgressEvent("stage", epoch, message=message))
    eval_accuracy = _evaluate(run, eval_set, epoch) if due else None
    seconds = time.perf_counter() - started
    return EpochRecord(epoch, loss, accuracy, eval_accuracy, lr, seconds, extra)


def _train_epoch(run: _Run, dataset: Dataset, epoch: int) -> tuple[float, float, float]:
    """One shuffled pass over ``dataset`` (this rank's share); returns (loss, accuracy, lr).

    The loss and accuracy are every rank's, summed at each progress report, so all ranks
    see the same figures and the divergence check stops them at the same step.
    """
    config, ranks = run.config, run.ranks
    loader = create_loader(
        dataset,
        config.batch_size // ranks.world,
        shuffle=True,
        seed=_loader_seed(config.seed, epoch),  # fixes the order and the workers' augmentation
        workers=config.workers,
        drop_last=len(dataset) > config.batch_size,  # no tiny last batch for BatchNorm
        pin_memory=run.device.type == "cuda",
        device=run.device,  # where a decoded data set's batches are augmented
        shard=(ranks.rank, ranks.world),
    )
    steps = steps_per_epoch(len(dataset), config.batch_size)  # the same for every rank count
    run.forward.train()
    # (loss sum, correct, images) of this rank, on the device: read only at reports
    sums = torch.zeros(3, dtype=torch.float64, device=run.device)
    checked = torch.zeros(3, dtype=torch.float64)  # every rank's sums at the last report
    for step, (images, targets) in enumerate(itertools.islice(loader, steps), start=1):
        done = (epoch - 1) * steps + step - 1  # steps before this one, over the whole run
        lr = learning_rate(config, done, steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        targets = targets.to(run.device, non_blocking=True)
        logits, loss = _step(run, images, targets)
        for hook in run.hooks:
            hook.after_step(done + 1)
        stop_point()
        sums[0] += loss.detach().double() * len(targets)
        sums[1] += (logits.argmax(1) == targets).sum()
        sums[2] += len(targets)
        if step % BATCH_EVENTS_EVERY == 0 or step == steps:
            totals = distributed.sum_over_ranks(sums).cpu()
            window = totals - checked
            run.loss_watch.check(epoch, float(window[0] / window[2]))
            checked = totals
            loss_mean, accuracy = float(totals[0] / totals[2]), float(totals[1] / totals[2])
            run.emit(ProgressEvent("batch", epoch, step, steps, loss_mean, accuracy, lr))
    if not all(bool(torch.isfinite(p).all()) for p in run.module.parameters()):
        run.loss_watch.check(epoch, math.inf)
    return float(checked[0] / checked[2]), float(checked[1] / checked[2]), lr


def _step(
    run: _Run, images: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and one optimizer step; returns (logits, loss)."""
    images = images.to(run.device, non_blocking=True, memory_format=run.memory_format)
    with _autocast(run):
        logits = run.forward(images)
        loss = run.objective(logits, images, targets)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return logits.detach(), loss


def _evaluate(run: _Run, dataset: Dataset, epoch: int) -> float:
    """Top-1 accuracy of the module on ``dataset`` (eval mode, no gradients)."""
    config = run.config
    loader = create_loader(
        dataset,
        config.batch_size,
        shuffle=False,
        seed=0,
        workers=config.workers,
        pin_memory=run.device.type == "cuda",
        device=run.device,
    )

    def progress(done: int, total: int) -> None:
        stop_point()
        run.emit(ProgressEvent("eval", epoch, done, total))

    with _autocast(run):
        return evaluate_torch(run.module, loader, run.device, progress=progress).top1


def _autocast(run: _Run) -> contextlib.AbstractContextManager:
    if run.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=run.autocast)


def _loader_seed(seed: int, epoch: int) -> int:
    """The loader seed of ``epoch``: fixed by (seed, epoch) alone, so resuming needs no state."""
    return seed * 100_003 + epoch


def _ignore(_event: ProgressEvent) -> None:
    pass


def _start_note(run: _Run, done: int, train_set: Dataset) -> str:
    precision = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}
    ranks, batch = run.ranks, run.config.batch_size
    where = f"{run.device} ({precision[run.autocast]})"
    if ranks.enabled:
        kind = "GPUs" if run.device.type == "cuda" else "CPU processes"
        where = (
            f"{ranks.world} {kind} ({ranks.backend}, {precision[run.autocast]}, "
            f"{batch // ranks.world} images each per step)"
        )
    return (
        f"training epochs {done + 1}-{run.config.epochs} on {where}, {len(train_set)} images, "
        f"batch {batch}"
    )


def _epoch_event(record: EpochRecord, epochs: int) -> ProgressEvent:
    return ProgressEvent(
        "epoch",
        record.epoch,
        record.epoch,
        epochs,
        loss=record.train_loss,
        accuracy=record.train_accuracy,
        lr=record.lr,
        eval_accuracy=record.eval_accuracy,
        extra=record.extra,
    )


# --- checkpoints -----------------------------------------------------------------------------


def _save(run: _Run, path: Path, history: list[EpochRecord], settings: dict) -> None:
    """Save the state after the last epoch of ``history`` (rank 0; the others wait for it)."""
    if not run.ranks.is_main:
        distributed.barrier()
        return
    state = {
        "epoch": history[-1].epoch,
        "model": run.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "history": [asdict(record) for record in history],
        "hooks": {hook.name: hook.state_dict() for hook in run.hooks},
        "rng": rng_state(),
        "config": asdict(run.config),
        "settings": settings,
    }
    save_checkpoint(path, state)
    write_metrics(path.parent / METRICS, history)
    distributed.barrier()


def _restore(run: _Run, checkpoint: dict, path: Path) -> tuple[list[EpochRecord], int]:
    """Load a checkpoint into the run and the global RNGs; returns (history, epochs done)."""
    try:
        run.module.load_state_dict(checkpoint["model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise UsageError(
            f"{path} holds the weights of another model; use another --workdir"
        ) from exc
    if checkpoint["scaler"] and run.scaler.is_enabled():
        run.scaler.load_state_dict(checkpoint["scaler"])
    for hook in run.hooks:
        if hook.name not in checkpoint["hooks"]:
            raise UsageError(f"{path} was saved without {hook.name}; use another --workdir")
        hook.load_state_dict(checkpoint["hooks"][hook.name])
    restore_rng_state(checkpoint["rng"])
    history = [EpochRecord(**record) for record in checkpoint["history"]]
    run.loss_watch.start_loss = history[0].train_loss if history else None
    done = checkpoint["epoch"]
    message = (
        f"resuming after epoch {done} of {run.config.epochs} from {path}"
        if done < run.config.epochs
        else f"{path} holds a finished run of {done} epochs; nothing to train"
    )
    run.emit(ProgressEvent("note", done, message=message))
    return history, done


def _fresh_start(seed: int) -> tuple[list[EpochRecord], int]:
    """Seed the global RNGs (augmentation without workers draws from torch's)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return [], 0
