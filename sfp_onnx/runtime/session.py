"""onnxruntime sessions: provider selection and session options, in one place.

Verification, evaluation and benchmarking all run models through :func:`create_session`, so
they see the same providers and settings. The CUDA and TensorRT providers are requested only
where they can really run (onnxruntime-gpu lists them even on machines without a GPU, and then
logs errors when asked for them).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sfp_onnx.errors import UsageError

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["OPT_LEVELS", "PROVIDERS", "create_session", "cuda_available", "resolve_providers"]

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
# graph optimisation levels -> onnxruntime's enum names (onnxruntime is imported on first use,
# so that the command line and the ONNX-only stages start without it)
OPT_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disable": "ORT_DISABLE_ALL",
}
_ORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@functools.cache
def cuda_available() -> bool:
    """True when a CUDA device is usable (checked through torch, which never logs errors)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken CUDA install means no CUDA, not a crash
        return False


def resolve_providers(provider: str = "auto") -> list[str]:
    """Map a user's provider choice to the onnxruntime provider list to request.

    Args:
        provider: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``tensorrt``.

    Raises:
        UsageError: unknown name, or a GPU provider asked for where none can run.
    """
    if provider not in PROVIDERS:
        raise UsageError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if provider == "auto":
        provider = "cuda" if cuda_available() else "cpu"
    if provider in ("cuda", "tensorrt"):
        if not cuda_available():
            raise UsageError(f"provider {provider!r} needs a CUDA GPU; none is available here")
        import onnxruntime as ort

        if _ORT_NAMES[provider] not in ort.get_available_providers():
            raise UsageError(f"this onnxruntime build has no {_ORT_NAMES[provider]}")
    chain = {"cpu": ["cpu"], "cuda": ["cuda", "cpu"], "tensorrt": ["tensorrt", "cuda", "cpu"]}
    return [_ORT_NAMES[p] for p in chain[provider]]


def create_session(
    model: str | os.PathLike | bytes,
    *,
    provider: str = "auto",
    threads: int | None = None,
    opt_level: str = "all",
    allow_spinning: bool = True,
) -> ort.InferenceSession:
    """Create an onnxruntime session for a model file (or serialized bytes).

    Args:
        model: path of an ``.onnx`` file (external data beside it is found) or model bytes.
        provider: see :func:`resolve_providers`.
        threads: intra-op threads; ``None`` lets onnxruntime use all cores.
        opt_level: graph optimisation level, one of :data:`OPT_LEVELS`.
        allow_spinning: False when several sessions share the cores (benchmark interleaving),
            so idle sessions' threads do not busy-wait and steal time from the running one.
    """
    if opt_level not in OPT_LEVELS:
        raise UsageError(
            f"unknown optimisation level {opt_level!r}; choose one of {list(OPT_LEVELS)}"
        )
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(Path(model))
    return ort.InferenceSession(source, options, providers=resolve_providers(provider))
