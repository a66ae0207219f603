"""Property-based tests of the surgery: random small CNNs, random masks, exact slim models.

Graph case: generated CNNs (:mod:`tests.fuzz_models`) of 2-5 blocks — conv+BN/bias+act,
residual blocks with identity or projection shortcuts, concatenations (two branches, or the
input and a branch; then maybe a BN over both), depthwise separable blocks,
squeeze-and-excitation, max/avg pooling — and
a GAP or Flatten head with one or two Linear layers, widths 1-24, 8×8 or 16×16 inputs,
exported through torch with BatchNorm kept or folded (opset 13 and 17). For ``slim`` the
nets are soft-pruned in torch first; for ``prune`` they are not.

Every example must hold (:mod:`tests.fuzz_checks`): the written model reproduces its
reference in onnxruntime on random and real CIFAR-10 inputs; every Conv/Gemm has the width an
independent oracle computes from the torch weights (exactly the removable channels went);
a second slim of the written model removes nothing. The dynamo exporter is slower and runs
in ``benchmarks/fuzz_surgery.py``, with ten and five times the examples.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sfp_onnx
from sfp_onnx.graph.soft_prune import CRITERIA
from tests.exports import export
from tests.fuzz_checks import assert_exact, assert_layers, check_prune, check_slim, onnx_layers
from tests.fuzz_models import (
    ConcatSpec,
    ConvSpec,
    HeadSpec,
    NetSpec,
    build_net,
    fuzz_cases,
    zero_channels,
)
from tests.fuzz_oracle import expected_layers


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny nets: one torch thread is fastest and leaves the other core alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(case=fuzz_cases())
def test_slim_removes_exactly_the_zero_channels(cifar10_root, case):
    """Soft-pruned in torch → slim: exact, the oracle's widths, nothing left to remove."""
    with tempfile.TemporaryDirectory() as folder:
        check_slim(case, Path(folder))


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(
    case=fuzz_cases(),
    rate=st.floats(0.0, 0.9, exclude_max=True),
    criterion=st.sampled_from(sorted(CRITERIA)),
    round_to=st.sampled_from((None, 1, 2, 4, 8)),
)
def test_prune_is_exact_and_idempotent(cifar10_root, case, rate, criterion, round_to):
    """prune at any rate, criterion, rounding: exact against --save-masked, each group
    loses prune_count(C) channels, and slimming the result again removes nothing."""
    with tempfile.TemporaryDirectory() as folder:
        check_prune(case, Path(folder), rate=rate, criterion=criterion, round_to=round_to)


def test_concat_of_the_graph_input_is_sliced(cifar10_root, tmp_path):
    """Found by the fuzzer: Concat([conv(x), x]) on the graph input (DenseNet-style) crashed
    the zero propagation (the graph input had no zero vector); the conv branch is pruned,
    the input's channels stay."""
    spec = NetSpec(8, (ConcatSpec(4, 0, "relu"), ConvSpec(6, 3, 1, "relu", "bn")), HeadSpec(
        flatten=False, hidden=None, act="relu", classes=3))  # fmt: skip
    net = build_net(spec, seed=0)
    with torch.no_grad():
        zero_channels(net.blocks[0].first, [1, 3], "sfp")
    source = export(net, tmp_path / "net.onnx", "kept17", size=8)
    out = tmp_path / "slim.onnx"

    sfp_onnx.slim(source, out)

    assert [shape for _, _, shape in onnx_layers(out)] == [
        (2, 3, 3, 3),  # the conv branch loses channels 1 and 3
        (6, 5, 3, 3),  # the next conv reads 2 branch channels + the 3 input channels
        (3, 6),
    ]
    assert_layers(source, out, expected_layers(net))
    assert_exact(source, out, size=8)


def test_oracle_keeps_a_channel_that_a_batchnorm_shifts(cifar10_root, tmp_path):
    """The oracle itself: a conv row zeroed without its BN stays (the BN adds a constant),
    with its BN zeroed too it goes — and sfp-onnx agrees."""
    spec = NetSpec(8, (ConvSpec(5, 3, 1, "leaky_relu", "bn"),), HeadSpec(False, None, "relu", 2))
    net = build_net(spec, seed=1)
    with torch.no_grad():
        zero_channels(net.blocks[0], [0, 1], "row")  # BN shift and mean stay: nonzero
        zero_channels(net.blocks[0], [3], "sfp")  # row, mean and shift: exactly zero
    assert [layer.after for layer in expected_layers(net)] == [(4, 3, 3, 3), (2, 4)]
    source = export(net, tmp_path / "net.onnx", "fold13", size=8)
    sfp_onnx.slim(source, tmp_path / "slim.onnx")
    assert_layers(source, tmp_path / "slim.onnx", expected_layers(net))
    assert_exact(source, tmp_path / "slim.onnx", size=8)
