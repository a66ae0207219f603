"""Tests of sfp_onnx.training.train: the lr schedule, the loop, checkpoints, resume, interrupts.

A tiny CNN (two convolutions with BatchNorm, a linear classifier) trains on CPU on 256 real
CIFAR-10 training images (augmented) and is evaluated on 100 real test images. The epoch-end
hook used in most tests zeroes the smallest-norm filter of the first convolution, as SFP does.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import signal
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sfp_onnx.data.datasets import DataConfig, Datasets, load_datasets
from sfp_onnx.errors import DataError, TrainingDiverged, TrainingInterrupted, UsageError
from sfp_onnx.training.hooks import TrainingHook
from sfp_onnx.training.train import (
    CHECKPOINT,
    METRICS,
    ProgressEvent,
    TrainConfig,
    learning_rate,
    resolve_device,
    train,
)

CONFIG = TrainConfig(epochs=3, batch_size=64, lr=0.05, workers=0, seed=0)
SETTINGS = {"rate": 0.3, "model": "resnet.onnx", "criterion": "l2"}


@pytest.fixture(scope="module")
def data(cifar10_root: Path) -> Datasets:
    """256 training and 100 test images of real CIFAR-10, class-balanced, 32x32."""
    config = DataConfig("cifar10", str(cifar10_root), train_limit=256, eval_limit=100, seed=0)
    return load_datasets(config, (32, 32))


def tiny_net(seed: int = 1) -> nn.Module:
    """conv-BN-ReLU-pool, conv-BN-ReLU, global pooling, linear; initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def zero_weakest_filter(epoch: int, module: nn.Module) -> dict:
    """SFP-like epoch end: zero the first conv's smallest-L2 filter (it may grow back)."""
    weight = module[0].weight
    with torch.no_grad():
        weakest = int(weight.flatten(1).norm(dim=1).argmin())
        weight[weakest] = 0.0
    return {"zeroed": np.int64(weakest), "kept_channels": 7, "channels": 8, "epoch": epoch}


class EpochEnd(TrainingHook):
    """A hook calling ``fn(epoch, net)`` at every epoch end, as a pruner would."""

    name = "epoch_end"

    def __init__(self, fn, net: nn.Module) -> None:
        self.fn, self.net = fn, net

    def epoch_end(self, epoch: int) -> dict:
        return self.fn(epoch, self.net)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def without_seconds(records) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in records]


def load_checkpoint(workdir: Path) -> dict:
    return torch.load(workdir / CHECKPOINT, weights_only=True)


# --- learning-rate schedule ------------------------------------------------------------------


def test_cosine_schedule_runs_from_lr_to_zero() -> None:
    """Cosine: lr at the first step, lr/2 halfway, ~0 at the last step, never increasing."""
    config = TrainConfig(epochs=10, lr=0.1)
    lrs = [learning_rate(config, step, 100) for step in range(1000)]
    assert lrs[0] == pytest.approx(0.1)
    assert learning_rate(config, 500, 100) == pytest.approx(0.05)
    assert 0 < lrs[-1] < 1e-5
    assert learning_rate(config, 1000, 100) == pytest.approx(0.0, abs=1e-12)
    assert all(b <= a for a, b in itertools.pairwise(lrs))


def test_step_schedule_drops_tenfold_at_half_and_three_quarters() -> None:
    """Step, 10 epochs: x0.1 from epoch 6 (5 done), x0.01 from epoch 9 (8 >= 7.5 done)."""
    config = TrainConfig(epochs=10, lr=0.1, schedule="step")
    by_epoch = [learning_rate(config, epoch * 10 + 9, 10) for epoch in range(10)]
    assert by_epoch == pytest.approx([0.1] * 5 + [0.01] * 3 + [0.001] * 2)
    assert learning_rate(config, 49, 10) == 0.1
    assert learning_rate(config, 50, 10) == pytest.approx(0.01)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_warmup_ramps_linearly_then_follows_the_schedule(schedule: str) -> None:
    """1.5 warmup epochs of 10 steps: lr/15, 2lr/15, ... lr at step 14, then the schedule."""
    config = TrainConfig(epochs=4, lr=0.3, schedule=schedule, warmup_epochs=1.5)
    ramp = [learning_rate(config, step, 10) for step in range(15)]
    assert ramp == pytest.approx([0.3 * (s + 1) / 15 for s in range(15)])
    assert learning_rate(config, 15, 10) == pytest.approx(0.3)
    assert learning_rate(config, 39, 10) < 0.3 * 0.2


@pytest.mark.parametrize(
    "changes",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": 0.0},
        {"momentum": 1.0},
        {"schedule": "linear"},
        {"device": "tpu"},
        {"workers": -1},
        {"eval_every": 0},
        {"warmup_epochs": 10.0},
        {"momentum": 0.0, "nesterov": True},
    ],
)
def test_config_rejects_bad_values(changes: dict) -> None:
    with pytest.raises(UsageError) as info:
        TrainConfig(**changes)
    assert "\n" not in str(info.value)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            resolve_device("cuda")


# --- the loop ----------------------------------------------------------------------------------


def test_two_epochs_train_hook_and_checkpoint(data: Datasets, tmp_path: Path) -> None:
    """Loss falls; the hook runs once per epoch; the checkpoint holds the masked weights;
    metrics.csv gains a row at every epoch end, during the run."""
    module, calls, events, rows_seen = tiny_net(), [], [], []
    config = replace(CONFIG, epochs=2)

    def hook(epoch: int, net: nn.Module) -> dict:
        calls.append(epoch)
        metrics = tmp_path / METRICS
        rows_seen.append(len(metrics.read_text().splitlines()) if metrics.exists() else 0)
        return zero_weakest_filter(epoch, net)

    result = train(
        module, data.train, data.test, config, workdir=tmp_path, hooks=[EpochEnd(hook, module)],
        on_progress=events.append, settings=SETTINGS,
    )  # fmt: skip

    assert calls == [1, 2]
    assert [r.epoch for r in result.epochs] == [1, 2]
    assert result.epochs[1].train_loss < result.epochs[0].train_loss
    assert all(0.0 <= r.eval_accuracy <= 1.0 for r in result.epochs)
    extra = result.epochs[1].extra
    assert extra["kept_channels"] == 7 and type(extra["zeroed"]) is int
    assert result.resumed_from is None and result.device == "cpu"
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT, METRICS]  # no temporary files left
    assert rows_seen == [0, 2]  # header + epoch 1, while epoch 2 was still running
    header, *rows = (tmp_path / METRICS).read_text().splitlines()
    assert header.split(",")[:4] == ["epoch", "train_loss", "train_accuracy", "val_accuracy"]
    assert [float(r.split(",")[1]) for r in rows] == [r.train_loss for r in result.epochs]

    saved = load_checkpoint(tmp_path)
    assert saved["epoch"] == 2
    assert_same_state(saved["model"], module.state_dict())
    assert not saved["model"]["0.weight"][extra["zeroed"]].any()  # saved after the hook
    assert saved["history"] == [asdict(r) for r in result.epochs]
    assert saved["config"] == asdict(config)
    assert saved["settings"] == SETTINGS
    assert saved["optimizer"]["state"]  # momentum buffers

    batches = [e for e in events if e.kind == "batch"]
    assert [(e.epoch, e.step, e.total) for e in batches] == [(1, 4, 4), (2, 4, 4)]
    assert batches[-1].lr == pytest.approx(result.epochs[1].lr)
    evals = [e for e in events if e.kind == "eval"]
    assert (evals[-1].step, evals[-1].total) == (100, 100)
    epochs = [e for e in events if e.kind == "epoch"]
    assert [e.extra for e in epochs] == [r.extra for r in result.epochs]
    assert epochs[1].eval_accuracy == result.epochs[1].eval_accuracy
    assert events[0].kind == "note" and "cpu" in events[0].message


def test_evaluation_sees_the_hooks_masking(data: Datasets, tmp_path: Path) -> None:
    """A hook zeroing the classifier makes every logit 0: argmax is class 0, 10 of 100 images."""

    def zero_classifier(_epoch: int, net: nn.Module) -> dict:
        with torch.no_grad():
            net[-1].weight.zero_()
            net[-1].bias.zero_()
        return {}

    config = replace(CONFIG, epochs=1)
    net = tiny_net()
    result = train(
        net, data.train, data.test, config, workdir=tmp_path,
        hooks=[EpochEnd(zero_classifier, net)],
    )  # fmt: skip
    assert result.epochs[0].eval_accuracy == pytest.approx(0.1)
    assert not load_checkpoint(tmp_path)["model"]["9.weight"].any()


def test_eval_every_skips_epochs_but_not_the_last(data: Datasets, tmp_path: Path) -> None:
    config = replace(CONFIG, epochs=3, eval_every=2)
    result = train(tiny_net(), data.train, data.test, config, workdir=tmp_path)
    assert [r.eval_accuracy is not None for r in result.epochs] == [False, True, True]


class _Explode(TrainingHook):
    """Multiplies the classifier's weights by 1e6 after step ``at`` (a learning rate gone bad)."""

    name = "explode"

    def __init__(self, net: nn.Module, at: int) -> None:
        self.net, self.at = net, at

    def after_step(self, step: int) -> None:
        if step == self.at:
            with torch.no_grad():
                self.net[-1].weight.mul_(1e6)


def test_exploding_loss_stops_with_one_line_and_keeps_the_last_good_epoch(
    data: Datasets, tmp_path: Path
) -> None:
    """A loss that explodes in epoch 2 (finite, but 1e5x its start) stops the run before the
    epoch is saved: the message names the epoch and --lr; the checkpoint is epoch 1's."""
    module = tiny_net()
    steps = math.ceil(len(data.train) / CONFIG.batch_size)
    with pytest.raises(TrainingDiverged) as info:
        train(
            module, data.train, data.test, replace(CONFIG, epochs=3), workdir=tmp_path,
            hooks=[_Explode(module, at=steps + 1)], settings=SETTINGS,
        )  # fmt: skip
    message = str(info.value)
    assert "training diverged in epoch 2" in message and "--lr" in message
    assert "\n" not in message
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["epoch"] == 1
    assert all(
        torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point()
    )


def test_empty_training_set_is_a_data_error(data: Datasets, tmp_path: Path) -> None:
    empty = torch.utils.data.Subset(data.train, [])
    with pytest.raises(DataError, match="no images"):
        train(tiny_net(), empty, None, CONFIG, workdir=tmp_path)


# --- interruption and resume -----------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_run_is_bit_identical(
    data: Datasets, tmp_path: Path, workers: int
) -> None:
    """3 epochs straight == Ctrl-C in epoch 2, then --resume into a differently seeded net."""
    config = replace(CONFIG, workers=workers)
    full = tiny_net()
    straight = train(
        full, data.train, data.test, config, workdir=tmp_path / "full",
        hooks=[EpochEnd(zero_weakest_filter, full)], settings=SETTINGS,
    )  # fmt: skip

    def ctrl_c_in_epoch_2(epoch: int, net: nn.Module) -> dict:
        if epoch == 2:
            raise KeyboardInterrupt
        return zero_weakest_filter(epoch, net)

    workdir = tmp_path / "stopped"
    stopped = tiny_net()
    with pytest.raises(TrainingInterrupted) as info:
        train(
            stopped, data.train, data.test, config, workdir=workdir,
            hooks=[EpochEnd(ctrl_c_in_epoch_2, stopped)], settings=SETTINGS,
        )  # fmt: skip
    message = str(info.value)
    assert "epoch 2" in message and "(epoch 1)" in message and "--resume" in message
    assert str(workdir) in message and info.value.exit_code == 130
    assert load_checkpoint(workdir)["epoch"] == 1

    calls = []

    def hook(epoch: int, net: nn.Module) -> dict:
        calls.append(epoch)
        return zero_weakest_filter(epoch, net)

    resumed_net = tiny_net(seed=99)  # other weights, and the global RNG reseeded
    resumed = train(
        resumed_net, data.train, data.test, config, workdir=workdir, resume=True,
        hooks=[EpochEnd(hook, resumed_net)], settings=SETTINGS,
    )  # fmt: skip
    assert calls == [2, 3]
    assert resumed.resumed_from == 1
    assert_same_state(resumed_net.state_dict(), full.state_dict())
    assert without_seconds(resumed.epochs) == without_seconds(straight.epochs)


class SignalAt(TrainingHook):
    """A hook that sends this process ``signum`` after step ``step`` (or at an epoch end)."""

    def __init__(self, signum: int, step: int | None = None, epoch: int | None = None) -> None:
        self.signum, self.step, self.epoch, self.steps_after = signum, step, epoch, 0

    def after_step(self, step: int) -> None:
        if self.step is not None and step >= self.step:
            self.steps_after += 1
            if step == self.step:
                os.kill(os.getpid(), self.signum)

    def epoch_end(self, epoch: int) -> dict:
        if epoch == self.epoch:
            os.kill(os.getpid(), self.signum)
        return {}


def test_sigterm_before_the_first_checkpoint(data: Datasets, tmp_path: Path) -> None:
    """SIGTERM stops like Ctrl-C, at the end of the step it came in; with nothing saved the
    message says to start over."""
    handler = signal.getsignal(signal.SIGTERM)
    hook = SignalAt(signal.SIGTERM, step=2)
    with pytest.raises(TrainingInterrupted, match="before the first checkpoint"):
        train(tiny_net(), data.train, None, CONFIG, workdir=tmp_path, hooks=[hook])
    assert hook.steps_after == 1  # no step ran after the one the signal came in
    assert not (tmp_path / CHECKPOINT).exists()
    assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_epoch_end_work_keeps_that_epoch(
    data: Datasets, tmp_path: Path, signum: int
) -> None:
    """A signal while an epoch's end work runs (re-selection, evaluation, the save) lets that
    epoch finish and be saved, then stops before the next one's first step."""
    config = replace(CONFIG, epochs=3)
    with pytest.raises(TrainingInterrupted, match=r"epoch 2; the last checkpoint \(epoch 1\)"):
        train(tiny_net(), data.train, None, config, workdir=tmp_path,
              hooks=[SignalAt(signum, epoch=1)])  # fmt: skip
    assert load_checkpoint(tmp_path)["epoch"] == 1


@pytest.fixture(scope="module")
def finished(data: Datasets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workdir of a finished 2-epoch run with SETTINGS."""
    workdir = tmp_path_factory.mktemp("finished")
    config = replace(CONFIG, epochs=2)
    train(tiny_net(), data.train, data.test, config, workdir=workdir, settings=SETTINGS)
    return workdir


@pytest.fixture()
def workdir(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run's workdir."""
    return Path(shutil.copytree(finished, tmp_path / "work"))


def test_existing_checkpoint_needs_resume(data: Datasets, workdir: Path) -> None:
    before = (workdir / CHECKPOINT).read_bytes()
    config = replace(CONFIG, epochs=2)
    with pytest.raises(UsageError, match="--resume") as info:
        train(tiny_net(), data.train, data.test, config, workdir=workdir, settings=SETTINGS)
    assert str(workdir) in str(info.value)
    assert (workdir / CHECKPOINT).read_bytes() == before


@pytest.mark.parametrize(
    ("config_changes", "settings_changes", "shown"),
    [
        ({}, {"rate": 0.4}, "rate 0.3 vs 0.4"),
        ({"lr": 0.1}, {}, "lr 0.05 vs 0.1"),
        ({"epochs": 5}, {}, "epochs 2 vs 5"),
        ({}, {"criterion": None}, "criterion l2 vs None"),
    ],
)
def test_resume_with_other_settings_fails(
    data: Datasets, workdir: Path, config_changes: dict, settings_changes: dict, shown: str
) -> None:
    config = replace(CONFIG, **{"epochs": 2, **config_changes})
    settings = {**SETTINGS, **settings_changes}
    with pytest.raises(UsageError) as info:
        train(
            tiny_net(), data.train, data.test, config, workdir=workdir, resume=True,
            settings=settings,
        )  # fmt: skip
    message = str(info.value)
    assert shown in message and str(workdir) in message and "\n" not in message


def test_resume_of_a_finished_run_returns_its_history(data: Datasets, workdir: Path) -> None:
    """Nothing is trained; the saved weights are loaded; execution options may differ."""
    config = replace(CONFIG, epochs=2, workers=1, eval_every=2)  # execution options only
    module, events = tiny_net(seed=7), []
    result = train(
        module, data.train, data.test, config, workdir=workdir, resume=True,
        on_progress=events.append, settings=SETTINGS,
    )  # fmt: skip
    saved = load_checkpoint(workdir)
    assert result.resumed_from == 2
    assert [asdict(r) for r in result.epochs] == saved["history"]
    assert_same_state(module.state_dict(), saved["model"])
    assert [e.kind for e in events] == ["note"] and "finished" in events[0].message


def test_resume_without_checkpoint_starts_fresh(data: Datasets, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    config = replace(CONFIG, epochs=1)
    result = train(
        tiny_net(), data.train, None, config, workdir=tmp_path, resume=True,
        on_progress=events.append,
    )  # fmt: skip
    assert "starting fresh" in events[0].message
    assert result.resumed_from is None and len(result.epochs) == 1
    assert result.epochs[0].eval_accuracy is None and math.isfinite(result.epochs[0].train_loss)
    assert load_checkpoint(tmp_path)["epoch"] == 1


def test_unreadable_checkpoint_is_a_usage_error(data: Datasets, tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot read"):
        train(tiny_net(), data.train, None, CONFIG, workdir=tmp_path, resume=True)


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on its path: what a hostile checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_checkpoint_that_would_run_code_is_refused(data: Datasets, tmp_path: Path) -> None:
    """Checkpoints load with weights_only=True: a pickled callable is refused, never called."""
    witness = tmp_path / "code_ran"
    torch.save({"format": 1, "payload": _RunsCode(witness)}, tmp_path / CHECKPOINT)
    with pytest.raises(UsageError, match="cannot read"):
        train(tiny_net(), data.train, None, CONFIG, workdir=tmp_path, resume=True)
    assert not witness.exists()
    torch.load(tmp_path / CHECKPOINT, weights_only=False)  # the same file, loaded unsafely:
    assert witness.exists()  # the code runs, so the test above could have failed
