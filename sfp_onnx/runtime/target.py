"""The execution target's preferences: which channel counts its fast kernels run well.

This module owns ``round_to="auto"``: the multiple of channels to keep per group so that the
pruned layers stay on the target's fast kernels. On a CPU, onnxruntime runs convolutions in
a blocked channel layout (NCHWc) whose block is the vector width in floats: 16 with AVX-512,
8 with AVX2. A Conv whose input channels are not whole blocks (a depthwise or grouped Conv:
whose channels are not), or a pooling over such a tensor, stays in the plain layout, with
layout conversions around it. On CUDA, cuDNN's tensor-core kernels want multiples of 8. The
module only decides the number; counting what to prune with it is
:func:`sfp_onnx.graph.soft_prune.prune_count`'s job.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from sfp_onnx.errors import UsageError

__all__ = ["GPU_ROUND_TO", "cpu_flags", "cpu_round_to", "resolve_round_to"]

GPU_ROUND_TO = 8  # cuDNN tensor-core convolutions want channel counts in multiples of 8
# CPU flag -> channels per vector register (float32); the widest flag present wins.
_VECTOR_CHANNELS = {"avx512f": 16, "avx2": 8, "avx": 8}
_DEFAULT_CPU_ROUND_TO = 8  # no flag known (another architecture, or no /proc/cpuinfo)
_GPU_PROVIDERS = frozenset({"cuda", "tensorrt"})
_PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where it is missing)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_round_to(flags: Iterable[str]) -> int:
    """Channels per block of onnxruntime's CPU kernels for a CPU with these flags (16 or 8)."""
    present = set(flags)
    widths = [width for flag, width in _VECTOR_CHANNELS.items() if flag in present]
    return max(widths, default=_DEFAULT_CPU_ROUND_TO)


def resolve_round_to(
    value: int | str | None,
    provider: str = "auto",
    *,
    flags: Iterable[str] | None = None,
) -> int | None:
    """The channel multiple to prune to: ``value`` itself, or the target's choice for ``auto``.

    Args:
        value: ``None`` (no rounding), a positive integer, or ``"auto"``; a string of digits
            is taken as that integer.
        provider: the target the model will run on: ``cpu``, ``cuda``, ``tensorrt``, or
            ``auto`` (CUDA when this machine has a usable GPU, else this CPU). A GPU target
            needs no GPU here.
        flags: CPU flags to decide by; default: this machine's (:func:`cpu_flags`).

    Returns:
        ``None`` for no rounding, else K >= 1: keep a multiple of K channels per group.

    Raises:
        UsageError: ``value`` is not None, ``auto`` or a positive integer, or ``provider`` is
            unknown.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise UsageError(f"--round-to must be a positive integer or 'auto', got {value}")
        return value
    if value != "auto":
        raise UsageError(f"--round-to must be a positive integer or 'auto', got {value!r}")
    if provider not in _PROVIDERS:
        raise UsageError(f"unknown provider {provider!r}; choose one of {', '.join(_PROVIDERS)}")
    if provider == "auto":
        from sfp_onnx.runtime.session import cuda_available  # imports onnxruntime: only when needed

        provider = "cuda" if cuda_available() else "cpu"
    if provider in _GPU_PROVIDERS:
        return GPU_ROUND_TO
    return cpu_round_to(cpu_flags() if flags is None else flags)
