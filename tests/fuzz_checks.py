"""The properties the surgery fuzzer checks, shared by the tests and the benchmark.

Each check builds a net from a :class:`tests.fuzz_models.FuzzCase`, exports it through torch,
runs the library the way a user does (:func:`sfp_onnx.slim`, :func:`sfp_onnx.prune`) and
asserts, on the written files: the model is exact in onnxruntime (random and real CIFAR-10
inputs, max|Δ| ≤ 1e-4·max|y|), every Conv/Gemm has the width the independent oracle of
:mod:`tests.fuzz_oracle` expects, and no channel that is zero wherever it is read is left
(a second slim would remove nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx

import sfp_onnx
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.load import load_model
from sfp_onnx.graph.soft_prune import prune_count
from sfp_onnx.graph.zeros import removable_channels
from sfp_onnx.runtime.session import create_session
from tests.exports import cifar_images, export
from tests.fuzz_models import FuzzCase, FuzzNet, build_net, soft_prune_net
from tests.fuzz_oracle import LayerShape, expected_layers

__all__ = [
    "Outcome",
    "assert_exact",
    "assert_layers",
    "assert_nothing_left",
    "check_prune",
    "check_slim",
    "onnx_layers",
]


@dataclass(frozen=True)
class Outcome:
    """What one checked example did (for the benchmark's counts)."""

    layers: int  # Conv and Gemm nodes
    groups: int  # channel groups of the oracle
    blocked: int  # of which blocked (graph input/output, joined to a concatenation)
    channels_before: int  # summed output widths of every Conv/Gemm
    channels_after: int
    ways: tuple[tuple[str, int], ...]  # how the channels were zeroed (slim only)
    max_abs_diff: float
    max_abs_output: float


def onnx_layers(path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """(node name, op, weight shape in torch layout) of every Conv/Gemm/MatMul, in file order."""
    model = onnx.load(str(path))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:  # the exporter shares equal weights through Identity nodes
        if node.op_type == "Identity" and node.input[0] in shapes:
            shapes[node.output[0]] = shapes[node.input[0]]
    layers = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.input[1] not in shapes:
            continue
        shape = shapes[node.input[1]]
        transposed = node.op_type == "MatMul" or (
            node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute)
        )
        op = "Conv" if node.op_type == "Conv" else "Gemm"
        layers.append((node.name, op, shape[::-1] if transposed else shape))
    return layers


def assert_layers(source: Path, slim: Path, expected: Sequence[LayerShape]) -> None:
    """The slim model's Conv/Gemm weights have the expected shapes, matched by node name."""
    before = onnx_layers(source)
    assert [(op, shape) for _, op, shape in before] == [(e.op, e.before) for e in expected], (
        "the source ONNX does not list the torch layers in forward order"
    )
    after = {name: shape for name, _, shape in onnx_layers(slim)}
    wrong = [
        f"{name}: {after.get(name)} instead of {e.after} (was {e.before})"
        for (name, _, _), e in zip(before, expected, strict=True)
        if after.get(name) != e.after
    ]
    assert not wrong, "slimmed weights differ from the oracle's:\n" + "\n".join(wrong)


@lru_cache(maxsize=4)
def _images(size: int) -> np.ndarray:
    return cifar_images(count=8, size=size)


def assert_exact(reference: Path, candidate: Path, size: int) -> tuple[float, float]:
    """max|Δ| ≤ 1e-4·max|y| on random and real CIFAR-10 inputs, in onnxruntime."""
    feeds = [
        np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32),
        _images(size),
    ]
    ref = create_session(reference, provider="cpu", threads=1)
    cand = create_session(candidate, provider="cpu", threads=1)
    diff, scale = 0.0, 0.0
    for x in feeds:
        y_ref = ref.run(None, {"input": x})[0]
        y_cand = cand.run(None, {"input": x})[0]
        assert y_cand.shape == y_ref.shape
        diff = max(diff, float(np.abs(y_ref - y_cand).max()))
        scale = max(scale, float(np.abs(y_ref).max()))
    assert diff <= 1e-4 * scale, f"max|Δ| {diff:.3g} > 1e-4 · max|y| {scale:.3g}"
    return diff, scale


def assert_nothing_left(path: Path, source: Path | None = None) -> None:
    """No channel of the written model is still zero wherever it is read: slim is idempotent.

    One exception, by design: a grouped conv left with one input channel per group is a
    depthwise conv in the written file, and a depthwise conv's groups can go whole (its
    ``group`` shrinks), where the grouped conv had to keep one channel in each group. When
    that happened (``source`` given), only the groups it does not reach are checked.
    """
    model = load_model(path)
    analysis = analyze_model(model)
    left = {g: idx.tolist() for g, idx in removable_channels(model, analysis).items()}
    if source is not None:
        nodes = {node.name: node for node in model.graph}
        for name in _became_depthwise(source, path):
            layout = analysis.layouts.get(nodes[name].inputs[0].name)
            for group_id, _ in layout.segments if layout is not None else ():
                left.pop(group_id, None)
    assert not any(left.values()), f"a second slim would remove {left}"


def _became_depthwise(source: Path, written: Path) -> list[str]:
    """Grouped convs (1 < C_in/G) of ``source`` that are depthwise (C_in/G = 1) in ``written``."""

    def per_group_inputs(path: Path) -> dict[str, int]:
        graph = onnx.load(str(path)).graph
        dims = {t.name: t.dims for t in graph.initializer}
        grouped = [n for n in graph.node if n.op_type == "Conv"
                   and any(a.name == "group" and a.i > 1 for a in n.attribute)]  # fmt: skip
        return {n.name: dims[n.input[1]][1] for n in grouped}

    before, after = per_group_inputs(source), per_group_inputs(written)
    return [node for node, width in after.items() if width == 1 and before.get(node, 1) > 1]


def _outcome(
    net: FuzzNet,
    expected: Sequence[LayerShape],
    exact: tuple[float, float],
    ways: Mapping[str, int] | None = None,
) -> Outcome:
    oracle = net.trace()
    roots = oracle.roots()
    return Outcome(
        layers=len(expected),
        groups=len(roots),
        blocked=sum(oracle.group_blocked(r) for r in roots),
        channels_before=sum(e.before[0] for e in expected),
        channels_after=sum(e.after[0] for e in expected),
        ways=tuple((ways or {}).items()),
        max_abs_diff=exact[0],
        max_abs_output=exact[1],
    )


def check_slim(case: FuzzCase, folder: Path) -> Outcome:
    """Soft-prune in torch, export, slim: exact, the expected shapes, nothing left to remove."""
    net = build_net(case.spec, case.weight_seed)
    ways = soft_prune_net(net, case.mask_seed)
    expected = expected_layers(net)
    source = export(net, folder / "source.onnx", case.variant, size=case.spec.size)
    slim = folder / "slim.onnx"
    sfp_onnx.slim(source, slim)
    exact = assert_exact(source, slim, case.spec.size)
    assert_layers(source, slim, expected)
    assert_nothing_left(slim, source)
    return _outcome(net, expected, exact, ways)


def check_prune(
    case: FuzzCase, folder: Path, *, rate: float, criterion: str, round_to: int | None
) -> Outcome:
    """Prune an unmasked net: exact against the masked model, the expected widths, idempotent.

    Every group the oracle finds prunable loses ``prune_count(C, rate, round_to, parts)`` channels
    (its random weights leave no other channel zero); blocked groups keep all of theirs. The
    count formula is the library's own (tests/test_round_to.py checks it); what is checked
    here is which groups exist, how they couple, and that each loses exactly its count.
    """
    net = build_net(case.spec, case.weight_seed)
    oracle = net.trace()
    kept = {
        root: size
        if oracle.group_blocked(root)
        else size - prune_count(size, rate, round_to, oracle.group_parts(root))
        for root, size in ((r, oracle.size[r]) for r in oracle.roots())
    }
    expected = expected_layers(net, kept)
    source = export(net, folder / "source.onnx", case.variant, size=case.spec.size)
    out, masked = folder / "pruned.onnx", folder / "masked.onnx"
    sfp_onnx.prune(
        source, out, rate=rate, criterion=criterion, round_to=round_to, save_masked=masked
    )
    exact = assert_exact(masked, out, case.spec.size)
    assert_layers(source, out, expected)
    assert_nothing_left(out, source)
    return _outcome(net, expected, exact)
