"""Latency benchmarking in onnxruntime: several models, several batch sizes, one report.

This module owns timing. It opens one session per model through
:func:`sfp_onnx.runtime.session.create_session`, feeds random inputs of each model's own dtype and
shape, and runs the models interleaved (A B A B ...) for each batch size, so that drift of
the machine (clock, heat, other load) falls on all of them alike. Each (model, batch size) is
summarised as latency percentiles and throughput beside the static costs that
:mod:`sfp_onnx.graph.measure` counts. It never prints: the CLI draws the progress bar from the
callback and the table from the returned :class:`BenchReport`.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from sfp_onnx._version import __version__
from sfp_onnx.errors import UnsupportedModelError, UsageError
from sfp_onnx.graph.measure import ModelStats, measure_model
from sfp_onnx.runtime.session import OPT_LEVELS, create_session, cuda_available, resolve_providers

__all__ = ["BenchConfig", "BenchReport", "BenchResult", "benchmark", "speedups"]

_SHORT_NAMES = {
    "CPUExecutionProvider": "cpu",
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "tensorrt",
}
_GPU_PROVIDERS = frozenset({"cuda", "tensorrt"})
_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}

Runner = Callable[[], object]


@dataclass(frozen=True)
class BenchConfig:
    """How to benchmark; the defaults suit a quick before/after comparison on a CPU."""

    batch_sizes: tuple[int, ...] = (1,)  # every model runs at each of these batch sizes
    warmup: int = 10  # untimed runs per model and batch size, before the timed ones
    runs: int = 50  # timed runs per model and batch size
    threads: int | None = None  # intra-op threads per session; None: onnxruntime's default
    provider: str = "auto"  # auto, cpu, cuda or tensorrt (see sfp_onnx.runtime.session)
    opt_level: str = "all"  # graph optimisation: all, extended, basic or disable


@dataclass(frozen=True)
class BenchResult:
    """One model at one batch size.

    Attributes:
        model: the model's path, as given.
        batch_size: samples per run.
        provider: the execution provider the session ran on (cpu, cuda, tensorrt).
        latency_ms: p50, p90, p99 and mean of the timed runs, in milliseconds per batch.
        throughput: samples per second (batch size / mean latency).
        macs: multiply-accumulates for one sample.
        params: parameter count.
        file_bytes: bytes on disk, external data included.
    """

    model: str
    batch_size: int
    provider: str
    latency_ms: dict[str, float]
    throughput: float
    macs: int
    params: int
    file_bytes: int


@dataclass(frozen=True)
class BenchReport:
    """All results (per batch size, models in the order given) and where they were measured."""

    results: tuple[BenchResult, ...]
    machine: dict[str, object]
    versions: dict[str, str]

    def to_json(self) -> dict:
        """Plain JSON data: ``{"results": [...], "machine": {...}, "versions": {...}}``."""
        return {
            "results": [asdict(result) for result in self.results],
            "machine": dict(self.machine),
            "versions": dict(self.versions),
        }


def benchmark(
    models: Sequence[str | os.PathLike],
    config: BenchConfig,
    progress: Callable[[int, int], None] | None = None,
) -> BenchReport:
    """Time models in onnxruntime, interleaved, at each batch size of ``config``.

    Args:
        models: ONNX files; the first is the baseline of :func:`speedups`.
        config: batch sizes, run counts and session settings.
        progress: called as ``progress(done, total)`` after every run, warm-up included.

    Raises:
        UsageError: bad config, a model listed twice, or a fixed batch that differs from a
            requested batch size.
        InvalidModelError: a model file is missing or not ONNX.
        UnsupportedModelError: a model input has a symbolic non-batch axis or an odd dtype.
    """
    paths = _check_models(models)
    _check_config(config)
    stats = [measure_model(path) for path in paths]
    sessions = [_open_session(path, config, shared=len(paths) > 1) for path in paths]
    for batch in config.batch_sizes:  # every shape error before the first timed run
        for path, session in zip(paths, sessions, strict=True):
            _input_shapes(session, batch, path)
    total = len(config.batch_sizes) * len(paths) * (config.warmup + config.runs)
    tick = _counter(total, progress)
    results = []
    for batch in config.batch_sizes:
        feeds = [_random_inputs(s, batch, p) for p, s in zip(paths, sessions, strict=True)]
        runners = [_runner(s, f) for s, f in zip(sessions, feeds, strict=True)]
        _interleave(runners, config.warmup, tick)
        timings = _interleave(runners, config.runs, tick)
        for path, session, stat, times in zip(paths, sessions, stats, timings, strict=True):
            results.append(_result(str(path), batch, _provider(session), times, stat))
    return BenchReport(tuple(results), machine_info(), versions())


def speedups(report: BenchReport) -> dict[tuple[str, int], float]:
    """(model, batch size) -> p50 latency of the first model / p50 latency of this one."""
    baselines: dict[int, BenchResult] = {}
    ratios = {}
    for result in report.results:
        base = baselines.setdefault(result.batch_size, result)
        ratios[(result.model, result.batch_size)] = (
            base.latency_ms["p50"] / result.latency_ms["p50"]
        )
    return ratios


def machine_info() -> dict[str, object]:
    """CPU model, logical cores, operating system and GPU name (None without a CUDA GPU)."""
    gpu = None
    if cuda_available():
        import torch

        gpu = torch.cuda.get_device_name(0)
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "os": platform.platform(), "gpu": gpu}


def versions() -> dict[str, str]:
    """Versions of the packages that decide the timings."""
    return {
        "sfp_onnx": __version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _check_models(models: Sequence[str | os.PathLike]) -> list[Path]:
    if not models:
        raise UsageError("give at least one model to benchmark")
    paths, seen = [], set()
    for model in models:
        path = Path(model)
        if path.resolve() in seen:
            raise UsageError(f"{path} is listed twice; benchmark a copy to compare it with itself")
        seen.add(path.resolve())
        paths.append(path)
    return paths


def _check_config(config: BenchConfig) -> None:
    if not config.batch_sizes or min(config.batch_sizes) < 1:
        raise UsageError(f"batch sizes must be positive, got {list(config.batch_sizes)}")
    if config.warmup < 0 or config.runs < 1:
        raise UsageError(f"need warmup >= 0 and runs >= 1, got {config.warmup}, {config.runs}")
    if config.threads is not None and config.threads < 1:
        raise UsageError(f"threads must be positive, got {config.threads}")
    if config.opt_level not in OPT_LEVELS:
        raise UsageError(
            f"unknown optimisation level {config.opt_level!r}; "
            f"choose one of {', '.join(OPT_LEVELS)}"
        )
    resolve_providers(config.provider)


def _open_session(path: Path, config: BenchConfig, shared: bool) -> ort.InferenceSession:
    """A session; its threads do not spin while other models' sessions share the cores."""
    return create_session(
        path,
        provider=config.provider,
        threads=config.threads,
        opt_level=config.opt_level,
        allow_spinning=not shared,
    )


def _input_shapes(session: ort.InferenceSession, batch: int, model: Path) -> dict[str, tuple]:
    """Each input's shape at ``batch``; axis 0 is the batch, every other axis must be fixed."""
    shapes = {}
    for arg in session.get_inputs():
        dims = list(arg.shape)
        if dims and isinstance(dims[0], int) and dims[0] != batch:
            raise UsageError(
                f"model {model} has a fixed batch of {dims[0]}; cannot run batch {batch}"
            )
        for axis, dim in enumerate(dims[1:], start=1):
            if not isinstance(dim, int):
                raise UnsupportedModelError(
                    f"model {model}: input {arg.name!r} has a symbolic dimension {dim!r} at "
                    f"axis {axis}; only the batch axis may be symbolic (export a fixed size)"
                )
        shapes[arg.name] = (batch, *dims[1:]) if dims else ()
    return shapes


def _random_inputs(session: ort.InferenceSession, batch: int, model: Path) -> dict[str, np.ndarray]:
    """Standard-normal inputs in each input's dtype and shape (batch axis set to ``batch``).

    Every model draws from the same seed, so models with one signature get the same inputs.
    """
    rng = np.random.default_rng(0)
    types = {arg.name: arg.type for arg in session.get_inputs()}
    feeds = {}
    for name, shape in _input_shapes(session, batch, model).items():
        if types[name] not in _NUMPY_TYPES:
            raise UnsupportedModelError(f"model {model}: input {name!r} has type {types[name]}")
        feeds[name] = rng.standard_normal(shape).astype(_NUMPY_TYPES[types[name]])
    return feeds


def _provider(session: ort.InferenceSession) -> str:
    name = session.get_providers()[0]
    return _SHORT_NAMES.get(name, name)


def _runner(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> Runner:
    """One inference per call; on a GPU the inputs stay on the device (IO binding)."""
    if _provider(session) not in _GPU_PROVIDERS:
        return lambda: session.run(None, feeds)
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", 0)
    return lambda: session.run_with_iobinding(binding)  # returns after the device finished


def _interleave(runners: Sequence[Runner], rounds: int, tick: Callable[[], None]) -> list[list]:
    """Run A B C A B C ... for ``rounds`` rounds; each runner's latencies in milliseconds."""
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(rounds):
        for index, run in enumerate(runners):
            start = time.perf_counter()
            run()
            times[index].append((time.perf_counter() - start) * 1e3)
            tick()
    return times


def _counter(total: int, progress: Callable[[int, int], None] | None) -> Callable[[], None]:
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    return tick


def _result(
    model: str, batch: int, provider: str, times_ms: list[float], stats: ModelStats
) -> BenchResult:
    times = np.asarray(times_ms)
    p50, p90, p99 = (float(v) for v in np.percentile(times, [50, 90, 99]))
    mean = float(times.mean())
    return BenchResult(
        model=model,
        batch_size=batch,
        provider=provider,
        latency_ms={"p50": p50, "p90": p90, "p99": p99, "mean": mean},
        throughput=batch * 1e3 / mean,
        macs=stats.macs,
        params=stats.params,
        file_bytes=stats.file_bytes,
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
