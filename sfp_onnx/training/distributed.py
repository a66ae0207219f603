"""Data-parallel training with torch.distributed: one process per device, started by torchrun.

This module owns what several processes must agree on, and nothing else. Under ``torchrun
--nproc-per-node N`` (the ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` variables it sets)
:func:`join` opens the process group — NCCL when training on CUDA, gloo on the CPU — and
gives each process its device; the training loop (:mod:`sfp_onnx.training.train`) then wraps
the module in ``DistributedDataParallel`` (gradients all-reduced, BatchNorm buffers taken from
rank 0 at every forward), reads its shard of every epoch, and sums its running loss over the
ranks so every rank sees the same figures and stops at the same step.

What the ranks must hold identical, and how they do:

- the weights: DDP all-reduces the gradients, so every rank applies the same update;
  :func:`check_agreement` compares a digest of them across the ranks after every mask
  re-selection, and stops the run if they differ (:class:`RanksDisagree`);
- the masks: chosen from the weights (identical) or from per-rank measurements (Taylor
  scores), so :func:`broadcast_from_main` hands every rank rank 0's choice.

Only rank 0 evaluates, saves checkpoints, writes outputs and reports; the others wait at
:func:`barrier`. A single process (no torchrun) runs with :data:`SINGLE` and every function
here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sfp_onnx.errors import SfpError, UsageError

__all__ = [
    "SINGLE",
    "Ranks",
    "RanksDisagree",
    "barrier",
    "broadcast_from_main",
    "check_agreement",
    "current",
    "digest",
    "environment_rank",
    "join",
    "launched",
    "leave",
    "main_first",
    "process_group",
    "restore_batchnorm",
    "sum_over_ranks",
    "use_sync_batchnorm",
]

# How long a rank waits for the others at a collective (rank 0 evaluates alone meanwhile).
TIMEOUT = datetime.timedelta(minutes=60)


class RanksDisagree(SfpError):
    """The processes of a distributed run no longer hold the same weights or masks (a bug)."""

    exit_code = 1


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a distributed run.

    Attributes:
        rank: this process's index among all of them (0: the one that reports and writes).
        world: how many processes train together.
        local_rank: its index on this machine (which GPU it uses).
        backend: ``nccl`` or ``gloo``; None for a single process.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


SINGLE = Ranks()


def launched() -> bool:
    """True in a process torchrun started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def environment_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), before any group opens."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def join(device: str) -> Ranks:
    """Open the process group torchrun's variables describe; the open one if there is one.

    Without torchrun and without an open group: :data:`SINGLE`.

    Args:
        device: the training device setting (``auto``, ``cpu``, ``cuda``): CUDA trains with
            NCCL, one GPU per local rank; the CPU with gloo.

    Raises:
        UsageError: more processes on this machine than GPUs when training on CUDA.
    """
    if dist.is_initialized():  # torchrun's, opened earlier, or the caller's own group
        return current()
    if not launched():
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"torchrun started local rank {local_rank} but this machine has "
                f"{torch.cuda.device_count()} CUDA GPUs; lower --nproc-per-node"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return current()


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Ranks]:
    """:func:`join` for the block, and :func:`leave` after it if this call opened the group."""
    opened = launched() and not dist.is_initialized()
    ranks = join(device)
    try:
        yield ranks
    finally:
        if opened:
            leave()


def current() -> Ranks:
    """This process's place in the open process group (SINGLE when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def leave() -> None:
    """Close the process group, if this process opened one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op for a single process)."""
    if current().enabled:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), then the other ranks run it."""
    ranks = current()
    if ranks.enabled and not ranks.is_main:
        dist.barrier()
    yield
    if ranks.enabled and ranks.is_main:
        dist.barrier()


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over every rank, as a new tensor (a copy for a single process)."""
    total = values.detach().clone()
    if current().enabled:
        dist.all_reduce(total)
    return total


def broadcast_from_main(masks: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Rank 0's masks (group id -> masked channels), on every rank."""
    if not current().enabled:
        return dict(masks)
    box = [{int(k): np.asarray(v, dtype=np.int64).tolist() for k, v in masks.items()}]
    dist.broadcast_object_list(box, src=0)
    return {k: np.asarray(v, dtype=np.int64) for k, v in box[0].items()}


def digest(module: nn.Module, masks: Mapping[int, np.ndarray]) -> str:
    """A hash of every parameter's bytes and of the masks: equal exactly when they are."""
    hasher = hashlib.sha256()
    for name, parameter in module.named_parameters():
        hasher.update(name.encode())
        hasher.update(parameter.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for key in sorted(masks):
        hasher.update(f"{key}:{np.asarray(masks[key]).tolist()}".encode())
    return hasher.hexdigest()


def check_agreement(module: nn.Module, masks: Mapping[int, np.ndarray]) -> bool:
    """Check that every rank holds the same weights and masks; True when one was made.

    Returns False for a single process (nothing to compare).

    Raises:
        RanksDisagree: naming the ranks whose weights or masks differ from rank 0's.
    """
    ranks = current()
    if not ranks.enabled:
        return False
    digests: list[str | None] = [None] * ranks.world
    dist.all_gather_object(digests, digest(module, masks))
    differing = [rank for rank, value in enumerate(digests) if value != digests[0]]
    if differing:
        raise RanksDisagree(
            f"ranks {differing} hold other weights or masks than rank 0 after a mask "
            "re-selection; the distributed run cannot continue (please report this)"
        )
    return True


def use_sync_batchnorm(module: nn.Module, device: torch.device) -> list[tuple]:
    """Swap every BatchNorm of ``module`` for a SyncBatchNorm sharing its tensors.

    The statistics of a training batch are then computed over every rank's share of it. The
    swapped-in modules hold the very parameters and buffers of the originals, so training
    them trains the originals; :func:`restore_batchnorm` puts the originals back.

    Returns:
        What :func:`restore_batchnorm` needs: (parent, attribute, original) per swap.

    Raises:
        UsageError: a distributed run on a device SyncBatchNorm does not support (the CPU).
    """
    if current().enabled and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices (gloo on the CPU cannot sync BatchNorm)")
    swaps = []
    for parent in list(module.modules()):
        for attribute, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
                child, nn.SyncBatchNorm
            ):
                parent.add_module(attribute, _synced(child))
                swaps.append((parent, attribute, child))
    return swaps


def restore_batchnorm(swaps: list[tuple]) -> None:
    """Undo :func:`use_sync_batchnorm`: the original modules, holding the trained tensors."""
    for parent, attribute, original in reversed(swaps):
        synced = getattr(parent, attribute)
        original.train(synced.training)
        original.num_batches_tracked = synced.num_batches_tracked
        parent.add_module(attribute, original)


def _synced(norm: nn.modules.batchnorm._BatchNorm) -> nn.SyncBatchNorm:
    synced = nn.SyncBatchNorm(
        norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats
    )
    synced.weight, synced.bias = norm.weight, norm.bias  # the same Parameters
    synced.running_mean, synced.running_var = norm.running_mean, norm.running_var
    synced.num_batches_tracked = norm.num_batches_tracked
    synced.train(norm.training)
    for name in ("onnx_mapping",):  # what the import's bookkeeping reads off a module
        if hasattr(norm, name):
            object.__setattr__(synced, name, getattr(norm, name))
    return synced
