"""Nothing lost: a compress run killed mid-epoch resumes to the same model; a full disk
leaves no partial file; an unwritable output directory is refused before any work.

Graph case: the CIFAR ResNet-8 of sfp_onnx.training.zoo (BN kept), real CIFAR-10 subsets. The
interrupted runs are real ``sfp-onnx`` processes stopped with SIGINT, SIGTERM or SIGKILL
while an epoch is in progress.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import sfp_onnx
from sfp_onnx.errors import OutputError
from tests.exports import cifar10_root

CLI = [sys.executable, "-m", "sfp_onnx.cli.main"]


def _compress_args(model: Path, out: Path, workdir: Path) -> list[str]:
    return [
        "compress", str(model), "--rate", "0.3", "--data", "cifar10",
        "--data-root", str(cifar10_root()), "--epochs", "3", "--train-limit", "600",
        "--eval-limit", "100", "--workers", "0", "--lr", "0.05", "--seed", "3",
        "--batch-size", "32", "--no-bench", "-o", str(out), "--workdir", str(workdir),
    ]  # fmt: skip


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, **kwargs)


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def uninterrupted(resnet8, tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    result = _run(_compress_args(resnet8, folder / "out.onnx", folder / "work"))
    assert result.returncode == 0, result.stderr
    return _weights(folder / "out.onnx")


def _default_sigint() -> None:
    """Ctrl-C as in a terminal: pytest-xdist's workers ignore SIGINT, and an ignored signal
    stays ignored across exec (Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_to_the_same_model(resnet8, uninterrupted, tmp_path, sig):
    out, work = tmp_path / "out.onnx", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        CLI + _compress_args(resnet8, out, work),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=_default_sigint,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (work / "checkpoint.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.05)
    process.send_signal(sig)  # epoch 2 is running now
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    if sig != signal.SIGKILL:
        assert "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists(), "an interrupted run writes no model"
    resumed = _run([*_compress_args(resnet8, out, work), "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    weights = _weights(out)
    assert weights.keys() == uninterrupted.keys()
    assert all(np.array_equal(weights[k], uninterrupted[k]) for k in weights)


def test_full_disk_gives_one_line_and_no_partial_file(resnet8, tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.raises(OutputError, match=r"(?i)no space left"):
            sfp_onnx.prune(resnet8, disk / "slim.onnx", rate=0.3)
        assert list(disk.iterdir()) == [], "no partial or temporary file is left"
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write: mode 0o500, or, for root, a read-only tmpfs."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot make a read-only directory here (root, and no tmpfs mount)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("command", ["prune", "compress"])
def test_unwritable_output_directory_fails_before_any_work(resnet8, read_only_dir, command):
    """One error line, at once (compress: before loading data or training), input unchanged."""
    before = resnet8.read_bytes()
    args = [*CLI, command, str(resnet8), "--rate", "0.3", "-o", str(read_only_dir / "s.onnx")]
    if command == "compress":
        args += ["--data", "cifar10", "--data-root", str(cifar10_root()), "--epochs", "1"]
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0
    assert lines == [f"error: output directory {read_only_dir} is not writable"], lines
    assert time.perf_counter() - start < 30, "refused before training"
    assert resnet8.read_bytes() == before
    assert list(read_only_dir.iterdir()) == []
