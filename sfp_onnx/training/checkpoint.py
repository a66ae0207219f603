"""Training checkpoints on disk: the file, the global RNG states, and the same-run check.

This module owns how a training state is stored: one ``checkpoint.pt`` per workdir, written
atomically, holding only tensors and plain containers so that ``torch.load(weights_only=True)``
reads it. It also captures and restores the global RNGs (torch, CUDA, numpy, Python), and
opens a saved run for ``--resume`` only if it is the same run (:func:`open_checkpoint` names
the settings that differ). What goes into the state, and when to save, is the training loop's
(:mod:`sfp_onnx.training.train`).
"""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch

from sfp_onnx._io import atomic_path
from sfp_onnx.errors import OutputError, UsageError

__all__ = [
    "CHECKPOINT",
    "FORMAT",
    "check_same_run",
    "checkpoint_path",
    "load_checkpoint",
    "open_checkpoint",
    "plain",
    "restore_rng_state",
    "rng_state",
    "save_checkpoint",
]

CHECKPOINT = "checkpoint.pt"  # the file name inside the workdir
FORMAT = 2  # bumped when the layout of the state changes (2: the hooks' states)


def checkpoint_path(workdir: str | os.PathLike) -> Path:
    """``workdir/checkpoint.pt``, creating ``workdir`` if needed (:class:`OutputError` if not)."""
    folder = Path(workdir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create workdir {folder}: {exc.strerror or exc}") from exc
    return folder / CHECKPOINT


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (tensors and plain containers) atomically, tagged with :data:`FORMAT`."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with ``weights_only=True``, tensors on the CPU.

    Raises:
        UsageError: the file is unreadable or not a checkpoint of this format.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        message = f"cannot read {path} ({reason}); delete it or use another --workdir"
        raise UsageError(message) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{path} is not a checkpoint of this version; use another --workdir")
    return state


def open_checkpoint(
    path: Path,
    resume: bool,
    config: Mapping,
    settings: Mapping,
    *,
    execution: Collection[str],
    note: Callable[[str], None],
) -> dict | None:
    """The checkpoint to continue from, or None to start fresh; checks it is the same run.

    ``config`` and ``settings`` are this run's (plain values); ``execution`` names the config
    fields that only say how it runs (device, workers...) and may change on a resume.

    Raises:
        UsageError: a checkpoint is there without ``resume``, or it is another run's.
    """
    if not path.exists():
        if resume:
            note(f"no checkpoint in {path.parent}; starting fresh")
        return None
    if not resume:
        raise UsageError(
            f"workdir {path.parent} already holds a checkpoint; pass --resume to continue "
            "that run, or use another --workdir"
        )
    checkpoint = load_checkpoint(path)

    def computes(values: Mapping) -> dict:
        return {k: v for k, v in values.items() if k not in execution}

    check_same_run(
        path,
        (computes(checkpoint["config"]), computes(config)),
        (checkpoint["settings"], settings),
    )
    return checkpoint


def check_same_run(path: Path, *pairs: tuple[Mapping, Mapping]) -> None:
    """Raise :class:`UsageError` naming what differs in each (saved, now) pair of settings."""
    diffs = [d for saved, now in pairs for d in _differences(saved, now)]
    if diffs:
        shown = ", ".join(diffs[:3]) + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise UsageError(
            f"workdir {path.parent} holds a run with other settings ({shown}); use another "
            f"--workdir, or delete {path} to start over"
        )


def _differences(saved: Mapping, now: Mapping) -> list[str]:
    unset = object()
    return [
        f"{key} {saved.get(key, 'unset')} vs {now.get(key, 'unset')}"
        for key in dict.fromkeys([*saved, *now])
        if saved.get(key, unset) != now.get(key, unset)
    ]


def rng_state() -> dict:
    """The global RNG states as tensors and plain lists (CUDA only when it was used)."""
    version, python_state, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict) -> None:
    """Set the global RNGs to a state from :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))


def plain(value: object) -> object:
    """``value`` as plain Python data: dicts with str keys, lists, numbers, strings, None.

    Tuples become lists, numpy and torch values Python numbers or lists, dataclasses dicts,
    paths strings, anything else its ``str``.
    """
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        return plain(value.tolist())
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)
