"""``round_to="auto"``: the channel multiple of the target, in the library and in the CLI.

Graph case: a CIFAR ResNet-8 of width 24 (stages of 24, 48 and 96 channels, 32 px), pruned
at rate 0.3, so rounding changes every group's kept count. Every pruning ends with the
onnxruntime exactness check of the written model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from sfp_onnx.cli.main import main

import sfp_onnx
from sfp_onnx.errors import UsageError
from sfp_onnx.runtime.session import cuda_available
from sfp_onnx.runtime.target import GPU_ROUND_TO, cpu_flags, cpu_round_to, resolve_round_to

AVX512 = {"fpu", "sse2", "avx", "avx2", "fma", "avx512f", "avx512bw"}
AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}
ARM = {"fp", "asimd", "aes"}


@pytest.mark.parametrize(
    ("channels", "rate", "round_to", "pruned"),
    [
        (16, 0.3, 8, 0),  # 12 kept lies halfway between 8 and 16: the tie keeps 16
        (32, 0.4, 8, 8),  # 20 kept, halfway: 24, not 16
        (64, 0.3, 8, 16),  # 45 kept -> 48
        (16, 0.4, 8, 8),  # 10 kept -> 8
        (64, 0.3, 16, 16),  # 45 kept -> 48
        (4, 0.5, 8, 0),  # narrower than the multiple: left whole
        (8, 0.9, 8, 0),  # 1 kept rounds up to the one multiple there is
        (64, 0.3, None, 19),  # no rounding: floor(0.3 * 64)
    ],
)
def test_rounded_counts(channels, rate, round_to, pruned):
    from sfp_onnx.graph.soft_prune import prune_count

    assert prune_count(channels, rate, round_to) == pruned


@pytest.mark.parametrize(
    ("channels", "rate", "round_to", "parts", "pruned"),
    [
        (128, 0.3, None, 32, 32),  # ResNeXt: 1 of each group's 4 channels
        (128, 0.3, 8, 32, 32),  # 96 kept is a multiple of lcm(8, 32) = 32
        (440, 0.3, None, 55, 110),  # RegNet, group width 8: 2 of each 8
        (440, 0.3, 8, 55, 0),  # lcm(8, 55) = 440: no width but the whole one
        (16, 0.9, None, 4, 12),  # each group keeps at least one channel
        (24, 0.3, 4, 2, 4),  # 2 parts of 12 lose 3 each: 18 kept, halfway -> 20 (10 per part)
    ],
)
def test_grouped_counts(channels, rate, round_to, parts, pruned):
    from sfp_onnx.graph.soft_prune import prune_count

    assert prune_count(channels, rate, round_to, parts) == pruned


def test_ramp_counts_move_one_channel_at_a_time_to_the_rounded_width():
    """On the way to the target the count follows the unrounded one, scaled to end exactly at
    the rounded width; rounding each step instead jumps (16 channels: 0, then 8 at once)."""
    import numpy as np

    from sfp_onnx.graph.soft_prune import prune_count, ramp_count

    for channels, target in ((16, 0.3), (32, 0.3), (64, 0.45), (16, 0.5)):
        for rate in np.linspace(0.0, target, 40):
            assert ramp_count(channels, rate, target) == prune_count(channels, rate)
    for channels, target, round_to in ((32, 0.3, 8), (16, 0.4, 8), (64, 0.3, 16), (32, 0.3, 16)):
        counts = [ramp_count(channels, r, target, round_to) for r in np.linspace(0, target, 200)]
        assert counts[-1] == prune_count(channels, target, round_to)
        assert counts == sorted(counts) and counts[0] == 0
        assert max(np.diff(counts)) <= 2, "no step removes more than two channels at once"
        stepped = [prune_count(channels, r, round_to) for r in np.linspace(0, target, 200)]
        assert max(np.diff(stepped)) >= round_to, "the rounded ramp it replaces jumps"
    grouped = [ramp_count(32, r, 0.5, 8, parts=4) for r in np.linspace(0, 0.5, 50)]
    assert all(c % 4 == 0 for c in grouped) and grouped[-1] == prune_count(32, 0.5, 8, 4)


def test_grouped_selection_takes_the_lowest_of_each_part():
    import numpy as np

    from sfp_onnx.graph.soft_prune import select_channels

    score = np.array([0, 1, 2, 3, 9, 8, 7, 6], dtype=float)
    assert select_channels(score, 4).tolist() == [0, 1, 2, 3]
    assert select_channels(score, 4, parts=2).tolist() == [0, 1, 6, 7]  # 2 of each half


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A CIFAR ResNet-8 of width 24 with a dynamic batch."""
    from sfp_onnx.training.zoo import create_cifar_resnet, export_onnx

    path = tmp_path_factory.mktemp("round_to") / "resnet8.onnx"
    export_onnx(create_cifar_resnet(depth=8, width=24), path)
    return path


@pytest.mark.parametrize(("flags", "expected"), [(AVX512, 16), (AVX2, 8), (ARM, 8), (set(), 8)])
def test_auto_on_cpu_follows_the_vector_width(flags, expected):
    """AVX-512 -> 16-channel blocks; AVX2, another architecture or no flags -> 8."""
    assert cpu_round_to(flags) == expected
    assert resolve_round_to("auto", "cpu", flags=flags) == expected


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_auto_on_gpu_is_8_whatever_the_cpu(provider):
    """A GPU target needs no GPU here and ignores the CPU's flags."""
    assert resolve_round_to("auto", provider, flags=AVX512) == GPU_ROUND_TO == 8


def test_auto_resolves_for_this_machine():
    """``provider="auto"``: CUDA when usable, else this CPU's /proc/cpuinfo flags."""
    expected = GPU_ROUND_TO if cuda_available() else cpu_round_to(cpu_flags())
    assert resolve_round_to("auto") == expected
    if Path("/proc/cpuinfo").exists():
        assert cpu_flags(), "a Linux CPU lists its flags"


@pytest.mark.parametrize(("value", "expected"), [(None, None), (1, 1), (8, 8), ("16", 16)])
def test_explicit_values_pass_through(value, expected):
    """None means no rounding; integers (or their digits) are kept as given."""
    assert resolve_round_to(value, "cpu", flags=AVX512) == expected


@pytest.mark.parametrize(
    ("value", "provider"), [(0, "cpu"), (-8, "cpu"), ("fast", "cpu"), (True, "cpu"),
                            (2.5, "cpu"), ("auto", "tpu")]
)  # fmt: skip
def test_bad_values_raise_one_line_usage_errors(value, provider):
    """Not a positive integer nor 'auto', or an unknown provider: one-line UsageError."""
    with pytest.raises(UsageError) as info:
        resolve_round_to(value, provider, flags=AVX512)
    assert "\n" not in str(info.value)


def test_prune_auto_keeps_multiples_of_the_target_block(model, tmp_path):
    """Every slimmed group keeps a multiple of K channels; the model stays exact."""
    k = resolve_round_to("auto")
    report = sfp_onnx.prune(model, tmp_path / "slim.onnx", rate=0.3, round_to="auto")
    assert report.settings["round_to"] == k
    assert report.settings["round_to_requested"] == "auto"
    slimmed = [g for g in report.groups if g.kept < g.channels]
    assert slimmed, "rate 0.3 slims some group"
    assert all(g.kept % k == 0 for g in slimmed)
    assert report.verification.exact
    unrounded = sfp_onnx.prune(model, tmp_path / "plain.onnx", rate=0.3)
    assert unrounded.settings["round_to"] is None
    assert any(g.kept % k for g in unrounded.groups if g.kept < g.channels)


def _prune_cli(model: Path, tmp_path: Path, *options: str):
    args = ["prune", str(model), "--rate", "0.3", "-o", str(tmp_path / "out.onnx"),
            "--report", str(tmp_path / "report.json"), *options]  # fmt: skip
    return CliRunner().invoke(main, args)


def test_cli_accepts_round_to_auto_and_prints_the_realised_rates(model, tmp_path):
    """``--round-to auto`` resolves as the library does; the summary shows min–max rates."""
    result = _prune_cli(model, tmp_path, "--round-to", "auto")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["round_to"] == resolve_round_to("auto")
    rates = [g["realised_rate"] for g in report["groups"] if g["kept"] < g["channels"]]
    line = re.search(
        r"realised rate in the (\d+) slimmed groups: ([\d.]+)%–([\d.]+)%", result.output
    )
    assert line, result.output
    assert int(line[1]) == len(rates)
    assert float(line[2]) == pytest.approx(100 * min(rates), abs=0.05)
    assert float(line[3]) == pytest.approx(100 * max(rates), abs=0.05)


@pytest.mark.parametrize(
    ("options", "expected"),
    [([], "auto"), (["--round-to", "none"], None), (["--round-to", "8"], 8),
     (["--round-to", "AUTO"], "auto")],
)  # fmt: skip
def test_cli_round_to_values(model, tmp_path, options, expected):
    """auto is the default; none disables rounding; a number is used as is."""
    result = _prune_cli(model, tmp_path, *options)
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "report.json").read_text())["settings"]
    assert settings["round_to"] == resolve_round_to(expected)
    assert result.output.count("realised rate in the") == 1


@pytest.mark.parametrize("option", ["0", "-4", "sixteen", "1.5"])
def test_cli_rejects_bad_round_to(model, tmp_path, option):
    """A bad value is a usage error (exit 2) naming the accepted forms; nothing is written."""
    result = _prune_cli(model, tmp_path, "--round-to", option)
    assert result.exit_code == 2
    assert "positive integer, 'auto' or 'none'" in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_cli_help_documents_auto():
    """``prune --help`` names the auto choice and what it picks."""
    result = CliRunner().invoke(main, ["prune", "--help"])
    assert result.exit_code == 0
    assert "--round-to K|auto|none" in result.output
    assert "AVX-512" in result.output
    assert "[default: auto]" in result.output
