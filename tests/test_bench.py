"""Benchmarking: interleaved onnxruntime timing, its report, and the ``bench`` command.

Graph cases: a CIFAR ResNet-8 (width 8, 32 px) exported with a dynamic batch, a byte-for-byte
copy of it, and the same network exported with a fixed batch of 1. Timings are real and so
noisy on a shared machine; only the self-comparison asserts on them, with a wide band.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from sfp_onnx.cli.main import main

from sfp_onnx.graph.measure import measure_model
from sfp_onnx.runtime.bench import BenchConfig, _interleave, benchmark, speedups
from sfp_onnx.runtime.session import create_session
from sfp_onnx.training.zoo import create_cifar_resnet, export_onnx

RESULT_KEYS = {
    "model",
    "batch_size",
    "provider",
    "latency_ms",
    "throughput",
    "macs",
    "params",
    "file_bytes",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(dynamic-batch model, its copy, fixed-batch model) of one small CIFAR ResNet."""
    folder = tmp_path_factory.mktemp("bench")
    net = create_cifar_resnet(depth=8, width=8)
    export_onnx(net, folder / "a.onnx")
    shutil.copy(folder / "a.onnx", folder / "b.onnx")
    export_onnx(net, folder / "fixed.onnx", dynamic_batch=False)
    return folder / "a.onnx", folder / "b.onnx", folder / "fixed.onnx"


def _cli(args: list[str]):
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_report_schema_and_order(models):
    """Results per batch size, models in the given order; JSON has exactly the agreed keys."""
    a, b, _ = models
    calls = []
    config = BenchConfig(batch_sizes=(1, 3), warmup=2, runs=5, threads=1, provider="cpu")
    report = benchmark([a, b], config, progress=lambda done, total: calls.append((done, total)))
    data = json.loads(json.dumps(report.to_json()))
    assert set(data) == {"results", "machine", "versions"}
    assert [(r["model"], r["batch_size"]) for r in data["results"]] == [
        (str(a), 1),
        (str(b), 1),
        (str(a), 3),
        (str(b), 3),
    ]
    stats = measure_model(a)
    for r in data["results"]:
        assert set(r) == RESULT_KEYS and r["provider"] == "cpu"
        latency = r["latency_ms"]
        assert set(latency) == {"p50", "p90", "p99", "mean"}
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
        assert r["throughput"] == pytest.approx(r["batch_size"] * 1e3 / latency["mean"])
        assert (r["macs"], r["params"], r["file_bytes"]) == (
            stats.macs,
            stats.params,
            stats.file_bytes,
        )
    assert {"cpu", "cores", "os", "gpu"} <= set(data["machine"])
    assert set(data["versions"]) == {"sfp_onnx", "onnxruntime", "onnx", "numpy", "python"}
    total = 2 * 2 * (2 + 5)  # batch sizes x models x (warmup + runs)
    assert calls == [(k, total) for k in range(1, total + 1)]


def test_copy_of_itself_is_not_faster(models):
    """A model against a byte-identical copy: speedup ~1 (wide band for a shared 2-core box)."""
    a, b, _ = models
    config = BenchConfig(warmup=20, runs=1000, threads=1, provider="cpu")
    ratios = speedups(benchmark([a, b], config))
    assert ratios[(str(a), 1)] == 1.0
    assert 0.7 <= ratios[(str(b), 1)] <= 1.4


def test_runs_interleave_a_b_a_b(models):
    """Real sessions run in turns A B A B ..., warm-up and timed rounds alike."""
    a, b, _ = models
    order = []
    feeds = {"input": np.zeros((1, 3, 32, 32), np.float32)}

    def runner(path, label):
        session = create_session(path, provider="cpu", threads=1, allow_spinning=False)
        return lambda: order.append(label) or session.run(None, feeds)

    times = _interleave([runner(a, "A"), runner(b, "B")], rounds=4, tick=lambda: None)
    assert order == ["A", "B"] * 4
    assert [len(t) for t in times] == [4, 4] and min(min(t) for t in times) > 0


def test_fixed_batch_model_runs_at_its_own_batch(models):
    """A model exported with batch 1 runs at batch 1."""
    _, _, fixed = models
    report = benchmark([fixed], BenchConfig(warmup=1, runs=3, threads=1, provider="cpu"))
    assert [r.batch_size for r in report.results] == [1]


def _assert_one_line_error(result, message: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [f"error: {message}"]


def test_cli_fixed_batch_mismatch(models):
    """Asking a fixed-batch model for batch 2 fails in one line, before any timing."""
    _, _, fixed = models
    result = _cli([fixed, "--batch-size", "2"])
    _assert_one_line_error(result, f"model {fixed} has a fixed batch of 1; cannot run batch 2")


def test_cli_unknown_provider(models):
    """An unknown provider name fails in one line listing the choices."""
    a, _, _ = models
    result = _cli([a, "--provider", "npu"])
    _assert_one_line_error(
        result, "unknown provider 'npu'; choose one of auto, cpu, cuda, tensorrt"
    )


def test_cli_table_and_json(models, tmp_path):
    """The command prints the summary table and writes the same report as JSON."""
    a, b, _ = models
    out = tmp_path / "bench.json"
    result = _cli(
        [a, b, "-b", "2", "--runs", "3", "--warmup", "1", "--threads", "1", "--json", out]
    )
    assert result.exit_code == 0, result.output
    for text in ("a.onnx", "b.onnx", "speedup", "MACs ratio", "1.00x", f"wrote {out}"):
        assert text in result.stdout
    data = json.loads(out.read_text())
    assert [(r["model"], r["batch_size"]) for r in data["results"]] == [(str(a), 2), (str(b), 2)]
