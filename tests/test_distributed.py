"""Data-parallel ``compress`` with torch.distributed: real torchrun, real gloo processes.

Two CPU processes (gloo) fine-tune a CIFAR ResNet on real CIFAR-10 images through the real
``sfp-onnx`` command under ``torchrun``: every mask re-selection is checked to leave both ranks
with the same weights and masks, only rank 0 prints and writes, and the written model is exact.
A run of two processes stopped mid-way resumes with one. The agreement check itself is shown to
fail on ranks that differ, and the data shards to split every epoch between the ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from sfp_onnx.data.decoded import Augmentation, DecodedImages
from sfp_onnx.data.loaders import create_loader
from sfp_onnx.training import distributed
from sfp_onnx.training.distributed import RanksDisagree
from sfp_onnx.training.hooks import TrainingHook
from tests.exports import cifar10_root

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
CLI = ["-m", "sfp_onnx.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _compress(model: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "compress", str(model), "--rate", "0.3", "--data", "cifar10",
        "--data-root", str(cifar10_root()), "--eval-limit", "128", "--val-split", "0.05",
        "--batch-size", "64", "--no-bench", "--workdir", str(tmp / "work"),
        "--report", str(tmp / "out.json"), "-o", str(tmp / "out.onnx"), *extra,
    ]  # fmt: skip


def _torchrun(processes: int, args: list[str], script: bool = False, **popen) -> subprocess.Popen:
    """torchrun with ``-m sfp_onnx.cli``, or (``script``) with the ``sfp-onnx`` console script."""
    program = ["--no-python", str(Path(sys.executable).parent / "sfp-onnx")] if script else CLI
    command = [*TORCHRUN, str(processes), *program, *args]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, **popen
    )


def test_two_gloo_processes_agree_at_every_reselection_and_rank0_alone_writes(resnet8, tmp_path):
    """Taylor scores are measured per rank, so only the broadcast keeps the masks identical;
    every re-selection is followed by the cross-rank digest check of weights and masks. The
    feature match rides along: its recorders sit inside the module DDP wraps."""
    args = _compress(
        resnet8, tmp_path, "--epochs", "2", "--train-limit", "640", "--criterion", "taylor",
        "--reselect-every", "2", "--freeze", "0.5", "--distill-features", "100",
        "--distill-features-decay", "0.8",
    )  # fmt: skip
    process = _torchrun(2, args)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert "on 2 CPU processes (gloo" in output, output
    # rank 0 alone reports: each line once
    assert output.count("starting accuracy: top-1") == 1, output
    assert output.count("epoch 2/2:") == 1, output
    assert output.count("top-1 accuracy (onnxruntime") == 1, output
    report = json.loads((tmp_path / "out.json").read_text())
    training = report["training"]
    assert (training["processes"], training["backend"]) == (2, "gloo")
    assert report["settings"]["distillation"]["features"] == 100.0
    extras = [epoch["extra"] for epoch in training["epochs"]]
    selections = sum(extra["selections"] for extra in extras)
    assert selections >= 3
    assert sum(extra["rank_checks"] for extra in extras) == selections
    assert report["verification"]["exact"], report["verification"]
    # rank 0 alone wrote: the outputs once, no per-rank leftovers
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert written == {"out.onnx", "out.json", "work", "work/checkpoint.pt", "work/metrics.csv"}


def test_a_two_process_run_stopped_mid_way_resumes_with_one(resnet8, tmp_path):
    args = _compress(resnet8, tmp_path, "--epochs", "3", "--train-limit", "1280")
    process = _torchrun(2, args, script=True, start_new_session=True)
    checkpoint = tmp_path / "work" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)  # torchrun and both ranks, as a scheduler would
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output
    assert output.count("error: interrupted in epoch") == 1, output  # rank 0 says it, once
    # torchrun itself reports the signal with a traceback of its own; the ranks print none
    assert "/sfp_onnx/" not in output and "sfp_onnx/cli" not in output, output
    assert not (tmp_path / "out.onnx").exists()
    saved = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= saved < 3

    resumed = subprocess.run(
        [sys.executable, *CLI, *args, "--resume"], capture_output=True, text=True, env=ENV,
        timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming after epoch {saved} of 3" in resumed.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    training = report["training"]
    assert (training["processes"], training["resumed_from"]) == (1, saved)
    assert [epoch["epoch"] for epoch in training["epochs"]] == [1, 2, 3]
    assert report["verification"]["exact"]


# --- the pieces, in two spawned gloo processes ------------------------------------------------


def _in_group(rank: int, world: int, init_file: str, results: dict, job) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results[rank] = job(rank)
    except Exception as exc:  # the parent asserts on what each rank saw
        results[rank] = exc
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path: Path, job, world: int = 2) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        init = str(tmp_path / "rendezvous")
        mp.spawn(_in_group, args=(world, init, results, job), nprocs=world, join=True)
        return dict(results)


def _module(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())


def _agreement_job(rank: int):
    masks = {0: np.array([1, 2]), 3: np.array([], dtype=np.int64)}
    same = distributed.check_agreement(_module(0), masks)
    other_masks = {0: np.array([1, 2 + rank])}
    try:
        distributed.check_agreement(_module(0), other_masks)
        masks_caught = False
    except RanksDisagree:
        masks_caught = True
    try:
        distributed.check_agreement(_module(rank), masks)  # rank 1: other weights
        weights_caught = False
    except RanksDisagree:
        weights_caught = True
    broadcast = distributed.broadcast_from_main({0: np.array([rank, 5])})
    total = distributed.sum_over_ranks(torch.tensor([1.0, float(rank)]))
    return same, masks_caught, weights_caught, broadcast[0].tolist(), total.tolist(), _odd_batch()


def _odd_batch() -> str | None:
    """``train`` with a batch of 3 over 2 ranks: the one-line usage error, or None."""
    from sfp_onnx.errors import UsageError
    from sfp_onnx.training.train import TrainConfig, train

    data = TensorDataset(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.int64))
    config = TrainConfig(epochs=1, batch_size=3, device="cpu")
    try:
        train(_module(0), data, None, config, workdir=f"/tmp/sfp-odd-batch-{os.getpid()}")
    except UsageError as exc:
        return str(exc)
    return None


def test_the_agreement_check_catches_ranks_that_differ(tmp_path):
    """Also: a batch that does not split over the ranks is a usage error on every rank."""
    results = _run_ranks(tmp_path, _agreement_job)
    for rank in (0, 1):
        assert not isinstance(results[rank], Exception), results[rank]
        same, masks_caught, weights_caught, broadcast, total, odd = results[rank]
        assert same and masks_caught and weights_caught
        assert broadcast == [0, 5]  # rank 0's masks on every rank
        assert total == [2.0, 1.0]
        assert "does not split evenly over 2 processes" in str(odd)


class _SignalledApart(TrainingHook):
    """SIGTERM to each rank at a different moment, as a process group's signal can land.

    Rank 0 has it before its stop point after step 2 but lingers there; rank 1 passes that
    stop point unsignalled, waits for rank 0 in step 3's collectives, and is signalled there.
    """

    def after_step(self, step: int) -> None:
        if step != 2:
            return
        if dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # rank 1 is blocked in step 3 and gets its signal meanwhile
        else:
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()


def _signalled_apart_job(rank: int):
    from sfp_onnx.errors import TrainingInterrupted
    from sfp_onnx.training.train import TrainConfig, train

    torch.manual_seed(0)
    model = nn.Sequential(_module(0), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 2, (32,)))
    config = TrainConfig(epochs=1, batch_size=4, device="cpu")
    workdir = f"/tmp/sfp-signalled-apart-{os.getppid()}"
    try:
        train(model, data, None, config, workdir=workdir, hooks=[_SignalledApart()])
    except TrainingInterrupted as exc:
        return f"interrupted: {exc}"
    except RuntimeError as exc:
        return f"crashed: {exc}"
    return "finished"


def test_ranks_signalled_at_different_steps_both_stop_as_interrupted(tmp_path):
    """The rank left waiting in a collective reads the peer's exit as the same interrupt."""
    results = _run_ranks(tmp_path, _signalled_apart_job)
    for rank in (0, 1):
        assert str(results[rank]).startswith("interrupted: interrupted in epoch 1"), results


def test_not_launched_by_torchrun_is_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group("cpu") as ranks:
        assert ranks == distributed.SINGLE and ranks.is_main and not ranks.enabled
        assert not dist.is_initialized()
        assert distributed.check_agreement(_module(0), {}) is False  # nothing to compare


# --- shards and SyncBatchNorm, in this process -------------------------------------------------


def _decoded(count: int) -> DecodedImages:
    images = torch.randint(0, 256, (count, 3, 8, 8), dtype=torch.uint8)
    targets = torch.arange(count)
    return DecodedImages(images, targets, (0.5,) * 3, (0.25,) * 3, Augmentation("crop"))


@pytest.mark.parametrize("decoded", [True, False], ids=["tensor batches", "data loader"])
def test_the_ranks_split_every_epoch_between_them(decoded):
    count = 64
    dataset = (
        _decoded(count) if decoded else TensorDataset(torch.zeros(count, 1), torch.arange(count))
    )
    seen = []
    for rank in (0, 1):
        loader = create_loader(dataset, 8, shuffle=True, seed=3, workers=0, shard=(rank, 2))
        seen.append(torch.cat([targets for _, targets in loader]).tolist())
    assert len(seen[0]) == len(seen[1]) == count // 2
    assert sorted(seen[0] + seen[1]) == list(range(count))  # disjoint, together all of it
    whole = create_loader(dataset, 8, shuffle=True, seed=3, workers=0)
    order = torch.cat([targets for _, targets in whole]).tolist()
    if decoded:  # the shards interleave the one shuffled order, as DistributedSampler does
        assert seen[0] == order[0::2] and seen[1] == order[1::2]


def test_the_ranks_augment_their_shards_with_their_own_draws():
    dataset = _decoded(64)
    single = DecodedImages(
        dataset.images[:1].repeat(64, 1, 1, 1), dataset.targets, (0.5,) * 3, (0.25,) * 3,
        Augmentation("crop"),
    )  # fmt: skip
    batches = [
        next(iter(create_loader(single, 32, shuffle=True, seed=3, shard=(rank, 2))))[0]
        for rank in (0, 1)
    ]
    assert not torch.equal(batches[0], batches[1])  # same image, other crops and flips


def test_sync_batchnorm_shares_the_tensors_and_gives_the_originals_back():
    module = _module(0)
    norm = module[1]
    images = torch.randn(4, 3, 10, 10)
    reference = module(images)
    swaps = distributed.use_sync_batchnorm(module, torch.device("cpu"))
    assert isinstance(module[1], nn.SyncBatchNorm) and module[1].weight is norm.weight
    torch.testing.assert_close(module(images), reference, rtol=0, atol=0)  # one process: BN
    distributed.restore_batchnorm(swaps)
    assert module[1] is norm and int(norm.num_batches_tracked) == 2  # trained through the swap
