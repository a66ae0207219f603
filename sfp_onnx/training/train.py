"""Training: the fine-tuning loop, its learning-rate schedule, when to checkpoint and resume.

This module owns one thing: running SGD epochs over a torch module, reproducibly. Each epoch
is, in order: lr per step, forward, the objective's loss, backward, step, every hook's
``after_step``; then every hook's ``epoch_end`` (soft pruning re-selects its masks there),
evaluation, checkpoint. A checkpoint holds what a fresh process needs to continue
bit-identically (weights, optimizer, RNG states, history, the hooks' states) plus the settings
that must match to continue. Ctrl-C or SIGTERM stops at the last checkpoint.

What it leaves to others: what rides on the loop (hooks, :mod:`sfp_onnx.training.hooks`),
the loss (:mod:`sfp_onnx.training.objectives`), datasets and loaders
(:mod:`sfp_onnx.data.datasets`), accuracy counting (:mod:`sfp_onnx.runtime.evaluate`), the
checkpoint file and RNG capture (:mod:`sfp_onnx.training.checkpoint`), and showing progress
(the CLI, through ``on_progress`` events).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sfp_onnx._io import write_text
from sfp_onnx.data.datasets import create_loader
from sfp_onnx.errors import DataError, TrainingDiverged, TrainingInterrupted, UsageError
from sfp_onnx.runtime.evaluate import evaluate_torch
from sfp_onnx.training.checkpoint import (
    CHECKPOINT,
    check_same_run,
    checkpoint_path,
    load_checkpoint,
    plain,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from sfp_onnx.training.hooks import TrainingHook
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
METRICS = "metrics.csv"  # per-epoch metrics beside the checkpoint, rewritten every epoch
BATCH_EVENTS_EVERY = 10  # steps between batch events (each one reads the loss off the GPU)
# Divergence: a window of steps whose mean loss exceeds this many times the run's first window.
EXPLODING_LOSS = 20.0
# TrainConfig fields on how a run executes, not what it computes: a resumed run may change them.
_EXECUTION_FIELDS = ("device", "amp", "channels_last", "workers", "eval_every")


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune; validated on construction (raises :class:`UsageError`)."""

    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # images per optimizer step
    lr: float = 0.01  # peak learning rate (a fine-tuning default; from scratch use ~0.1)
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
class EpochRecord:
    """What one epoch did.

    Attributes:
        epoch: 1-based epoch number.
        train_loss: mean cross-entropy over the epoch's training batches.
        train_accuracy: top-1 accuracy on the training batches, as they were trained on.
        eval_accuracy: top-1 accuracy on the evaluation set after the epoch-end hook, or None
            when the epoch was not evaluated.
        lr: learning rate of the epoch's last step.
        seconds: wall time of the epoch (training, hook and evaluation).
        extra: what the hooks' ``epoch_end`` returned (soft pruning: rate, kept channels...).
    """

    epoch: int
    train_loss: float
    train_accuracy: float
    eval_accuracy: float | None
    lr: float
    seconds: float
    extra: dict


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`train`.

    Attributes:
        epochs: one record per epoch of the whole run, resumed epochs included.
        seconds: wall time of this call.
        resumed_from: the epoch the run continued after, or None for a fresh start.
        device: the device trained on.
    """

    epochs: tuple[EpochRecord, ...]
    seconds: float
    resumed_from: int | None
    device: str


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
    emit = on_progress or _ignore
    settings = plain(settings or {})
    device = resolve_device(config.device)
    path = checkpoint_path(workdir)
    checkpoint = _open_checkpoint(path, resume, config, settings, emit)
    run = _create_run(module, config, device, emit, objective or CrossEntropy(), hooks)
    history, done = _restore(run, checkpoint, path) if checkpoint else _fresh_start(config.seed)
    for hook in hooks:
        hook.start(steps_per_epoch(len(train_set), config.batch_size), config.epochs)
    if done < config.epochs:
        emit(ProgressEvent("note", done, message=_start_note(run, done, train_set)))
    with _sigterm_raises_interrupt():
        for epoch in range(done + 1, config.epochs + 1):
            try:
                record = _run_epoch(run, train_set, eval_set, epoch)
                _save(run, path, [*history, record], settings)
            except KeyboardInterrupt:  # epoch - 1 is the last one saved (0: none yet)
                raise _interrupted(epoch, epoch - 1, path) from None
            except TrainingDiverged as exc:
                raise TrainingDiverged(f"{exc}; {_last_checkpoint(epoch - 1, path)}") from None
            history.append(record)
            emit(_epoch_event(record, config.epochs))
    module.to(memory_format=torch.contiguous_format)
    resumed_from = checkpoint["epoch"] if checkpoint else None
    return TrainResult(tuple(history), time.perf_counter() - started, resumed_from, str(device))


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
    start_loss: float | None = None  # mean loss of the run's first steps (divergence check)


def _create_run(
    module: torch.nn.Module,
    config: TrainConfig,
    device: torch.device,
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
        module, optimizer, scaler, objective, hooks, config, device, autocast, memory_format, emit
    )


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
    if due:
        message = f"epoch {epoch}: validating on {len(eval_set)} images"
        run.emit(ProgressEvent("stage", epoch, message=message))
    eval_accuracy = _evaluate(run, eval_set, epoch) if due else None
    seconds = time.perf_counter() - started
    return EpochRecord(epoch, loss, accuracy, eval_accuracy, lr, seconds, extra)


def _train_epoch(run: _Run, dataset: Dataset, epoch: int) -> tuple[float, float, float]:
    """One shuffled pass over ``dataset``; returns (mean loss, accuracy, last lr)."""
    config = run.config
    loader = create_loader(
        dataset,
        config.batch_size,
        shuffle=True,
        seed=_loader_seed(config.seed, epoch),  # fixes the order and the workers' augmentation
        workers=config.workers,
        drop_last=len(dataset) > config.batch_size,  # no tiny last batch for BatchNorm
        pin_memory=run.device.type == "cuda",
        device=run.device,  # where a decoded data set's batches are augmented
    )
    steps = len(loader)
    run.module.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    seen, checked = 0, (0.0, 0)  # (loss sum, images) at the last divergence check
    for step, (images, targets) in enumerate(loader, start=1):
        done = (epoch - 1) * steps + step - 1  # steps before this one, over the whole run
        lr = learning_rate(config, done, steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        targets = targets.to(run.device, non_blocking=True)
        logits, loss = _step(run, images, targets)
        for hook in run.hooks:
            hook.after_step(done + 1)
        loss_sum += loss.detach().double() * len(targets)
        correct += (logits.argmax(1) == targets).sum()
        seen += len(targets)
        if step % BATCH_EVENTS_EVERY == 0 or step == steps:
            total = loss_sum.item()
            _check_divergence(run, epoch, (total - checked[0]) / (seen - checked[1]))
            checked = (total, seen)
            accuracy = correct.item() / seen
            run.emit(ProgressEvent("batch", epoch, step, steps, total / seen, accuracy, lr))
    if not all(bool(torch.isfinite(p).all()) for p in run.module.parameters()):
        _check_divergence(run, epoch, math.inf)
    return loss_sum.item() / seen, correct.item() / seen, lr


def _check_divergence(run: _Run, epoch: int, window_loss: float) -> None:
    """Stop when the loss of the last steps is not finite, or explodes against the first.

    Raises:
        TrainingDiverged: naming the epoch and what to change; the epoch is not saved.
    """
    if run.start_loss is None and math.isfinite(window_loss):
        run.start_loss = window_loss
    limit = EXPLODING_LOSS * max(run.start_loss or 1.0, 1.0)
    if math.isfinite(window_loss) and window_loss <= limit:
        return
    what = "the weights are not finite" if window_loss == math.inf else f"loss {window_loss:.3g}"
    raise TrainingDiverged(
        f"training diverged in epoch {epoch} ({what}, against {run.start_loss or float('nan'):.3g} "
        f"at the start); lower --lr (now {run.config.lr:g})"
    )


def _step(
    run: _Run, images: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and one optimizer step; returns (logits, loss)."""
    images = images.to(run.device, non_blocking=True, memory_format=run.memory_format)
    with _autocast(run):
        logits = run.module(images)
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
    return (
        f"training epochs {done + 1}-{run.config.epochs} on {run.device} "
        f"({precision[run.autocast]}), {len(train_set)} images, batch {run.config.batch_size}"
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


def _open_checkpoint(
    path: Path,
    resume: bool,
    config: TrainConfig,
    settings: dict,
    emit: Callable[[ProgressEvent], None],
) -> dict | None:
    """The checkpoint to continue from, or None to start fresh; checks it fits this run."""
    if not path.exists():
        if resume:
            emit(ProgressEvent("note", message=f"no checkpoint in {path.parent}; starting fresh"))
        return None
    if not resume:
        raise UsageError(
            f"workdir {path.parent} already holds a checkpoint; pass --resume to continue "
            "that run, or use another --workdir"
        )
    checkpoint = load_checkpoint(path)
    check_same_run(
        path,
        (_what_it_computes(checkpoint["config"]), _what_it_computes(asdict(config))),
        (checkpoint["settings"], settings),
    )
    return checkpoint


def _what_it_computes(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _EXECUTION_FIELDS}


def _save(run: _Run, path: Path, history: list[EpochRecord], settings: dict) -> None:
    """Save the state after the last epoch of ``history``."""
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


def write_metrics(path: Path, history: list[EpochRecord]) -> None:
    """``metrics.csv``: one row per epoch so far (rewritten whole, atomically, every epoch)."""
    extra_keys = sorted({k for r in history for k, v in r.extra.items() if _scalar(v)})
    header = ["epoch", "train_loss", "train_accuracy", "val_accuracy", "lr", "seconds"]
    rows = [",".join([*header, *extra_keys])]
    for r in history:
        cells = [r.epoch, r.train_loss, r.train_accuracy, r.eval_accuracy, r.lr, r.seconds]
        cells += [r.extra.get(k) for k in extra_keys]
        rows.append(",".join("" if c is None else f"{c}" for c in cells))
    write_text(path, "\n".join(rows) + "\n")


def _scalar(value: object) -> bool:
    return isinstance(value, bool | int | float | str)


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
    run.start_loss = history[0].train_loss if history else None
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


# --- interruption ----------------------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_raises_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while training (signals only reach the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _last_checkpoint(saved: int, path: Path) -> str:
    if saved == 0:
        return "no epoch was saved"
    return f"the last good checkpoint (epoch {saved}) is in {path.parent}"


def _interrupted(epoch: int, saved: int, path: Path) -> TrainingInterrupted:
    if saved == 0:
        with contextlib.suppress(OSError):  # leave no empty work folder behind
            path.parent.rmdir()
        return TrainingInterrupted(
            f"interrupted in epoch {epoch}, before the first checkpoint; rerun to start over"
        )
    return TrainingInterrupted(
        f"interrupted in epoch {epoch}; the last checkpoint (epoch {saved}) is in "
        f"{path.parent}; rerun with --resume to continue"
    )
