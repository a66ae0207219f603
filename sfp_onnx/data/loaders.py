"""Data loaders: deterministic batches of a dataset, for one process or one rank of several.

This module owns how a dataset is read in batches: a DataLoader whose order and workers'
augmentation are fixed by a seed (its workers leave Ctrl-C and SIGTERM to the main process),
or, for a set decoded into memory, :class:`~sfp_onnx.data.decoded.TensorBatches`; in a
distributed run each rank reads its shard of the one shuffled order. Which datasets exist and
how they are transformed is :mod:`sfp_onnx.data.datasets`'.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sfp_onnx.data.decoded import DecodedImages, TensorBatches
from sfp_onnx.errors import UsageError

__all__ = ["create_loader"]


def create_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    workers: int | None = None,
    *,
    drop_last: bool = False,
    pin_memory: bool = False,
    device: torch.device | str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> DataLoader | TensorBatches:
    """A DataLoader whose order (and workers' augmentation) is fixed by ``seed``.

    A decoded data set (:class:`~sfp_onnx.data.decoded.DecodedImages`) gets its tensor-op
    batches instead, on ``device``, with the same seeding.

    With ``workers=0`` augmentation runs in this process and draws from torch's global
    random generator; seed that with :func:`torch.manual_seed` for repeatable crops.

    Args:
        dataset: the dataset to load.
        batch_size: images per batch (>= 1).
        shuffle: reshuffle every epoch.
        seed: seed of the shuffling and of the workers' random generators.
        workers: loader processes; ``None`` uses ``min(4, CPU count)``, 0 loads in-process.
        drop_last: drop the last incomplete batch.
        pin_memory: pin batches for faster copies to a GPU.
        device: where a decoded set's batches are made (default: the CPU).
        shard: (rank, world): this process reads every ``world``-th image of the shuffled
            order, from ``rank`` on (as a DistributedSampler; the order is the same on every
            rank, the augmentation draws differ).

    Raises:
        UsageError: ``batch_size`` < 1 or ``workers`` < 0.
    """
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} is too small; give a value >= 1")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers < 0:
        raise UsageError(f"workers is {workers}; give 0 (load in-process) or more")
    rank, world = shard
    if isinstance(dataset, DecodedImages):
        return TensorBatches(
            dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, device=device,
            rank=rank, world=world,
        )  # fmt: skip
    sampler = None
    if world > 1:
        sampler = DistributedSampler(dataset, world, rank, shuffle=shuffle, seed=seed)
    return _StoppableLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed + 7919 * rank),
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=_leave_stop_signals_to_the_parent if workers else None,
    )


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class _StoppableLoader(DataLoader):
    """A DataLoader whose workers leave Ctrl-C and SIGTERM to this process.

    Sent to the whole process group (a terminal closing, ``timeout``, ``scancel``), the signals
    would otherwise reach the workers too; a worker dying on one takes this process down with a
    ``DataLoader worker ... is killed`` traceback. The signals are blocked while the workers are
    forked (so a worker cannot receive one before it ignores them), and delivered here right
    after: this process stops cleanly and shuts its workers down itself.
    """

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        if threading.current_thread() is not threading.main_thread():
            return _tracked(super().__iter__())
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return _tracked(super().__iter__())
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


# Iterators whose worker processes may still run. Workers ignore SIGTERM, so multiprocessing's
# exit handler (terminate, then join every child) would wait forever on the workers of an
# iterator still referenced at exit — an interrupt's traceback keeps the loop's frame alive, so
# the stop hung whenever no garbage collection had freed it first. The handler below shuts them
# down first (atexit runs handlers last-registered first, and this one registers after
# multiprocessing's, imported by torch.utils.data).
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()
_EXIT_HANDLER_REGISTERED = False


def _tracked(iterator):
    global _EXIT_HANDLER_REGISTERED
    if hasattr(iterator, "_shutdown_workers"):
        _LIVE_ITERATORS.add(iterator)
        if not _EXIT_HANDLER_REGISTERED:
            atexit.register(_shut_down_live_workers)
            _EXIT_HANDLER_REGISTERED = True
    return iterator


def _shut_down_live_workers() -> None:
    for iterator in list(_LIVE_ITERATORS):
        iterator._shutdown_workers()  # idempotent; tells the workers to stop, then joins them


def _leave_stop_signals_to_the_parent(_worker_id: int) -> None:
    """In a loader worker: ignore Ctrl-C and SIGTERM (see _StoppableLoader), then unblock them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
