"""The paper's SFP on an imported ONNX ResNet: masks, coupling, regrowth, schedule, surgery.

Graph case: the small ResidualNet exported with BN kept (opset 17), imported with onnx2torch.
Its stage-1 residual group couples the stem conv and both blocks' second convs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.load import clone_model, load_model
from sfp_onnx.graph.rewrite import rewrite_model
from sfp_onnx.graph.zeros import removable_channels
from sfp_onnx.runtime.verify import verify_models
from sfp_onnx.training.import_torch import import_model, write_back
from sfp_onnx.training.sfp import PaperSfpPruner, SfpConfig, rate_at
from tests.exports import ResidualNet, cifar_images, export, randomize_norms


@pytest.fixture()
def imported(tmp_path):
    torch.manual_seed(0)
    path = export(randomize_norms(ResidualNet(width=8)), tmp_path / "net.onnx", "kept17", 32)
    model = load_model(path)
    analysis = analyze_model(model)
    return model, analysis, import_model(model)


def _paper(**settings) -> SfpConfig:
    return SfpConfig(method="sfp-paper", schedule="constant", **settings)


def _channel_zero(imp, group, index: int) -> bool:
    for piece in group.slices:
        if piece.kind in ("filter", "bias", "mean"):
            tensor = imp.tensor(piece.tensor)
            moved = tensor.movedim(piece.axis, 0)
            rows = moved[
                piece.offset + index * piece.block : piece.offset + (index + 1) * piece.block
            ]
            if rows.abs().sum() != 0:
                return False
    return True


def test_import_matches_onnxruntime_and_links_every_pruned_weight(imported):
    model, analysis, imp = imported
    images = cifar_images(count=8, size=32)
    with torch.no_grad():
        ours = imp.module.eval()(torch.from_numpy(images)).numpy()
    from sfp_onnx.runtime.verify import _session

    theirs = _session(model, "m").run(None, {"input": images})[0]
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    needed = {p.tensor for g in analysis.prunable_groups for p in g.slices}
    assert needed <= set(imp.links)
    trainable = {id(p) for p in imp.module.parameters()}
    filters = [imp.tensor(p.tensor) for g in analysis.prunable_groups for p in g.filters]
    assert all(
        t.requires_grad and id(t._base if t._base is not None else t) in trainable for t in filters
    )


def test_coupled_producers_carry_identical_masks(imported):
    _, analysis, imp = imported
    pruner = PaperSfpPruner(imp, analysis.groups, _paper(rate=0.3))
    stats = pruner.step(10, 10)
    stream = next(g for g in analysis.prunable_groups if len(g.filters) == 3)
    chosen = pruner.masks[stream.id]
    assert len(chosen) == math.floor(0.3 * stream.channels)
    for index in range(stream.channels):
        assert _channel_zero(imp, stream, index) == (index in chosen)
    assert stats["kept_channels"] == stats["channels"] - sum(len(m) for m in pruner.masks.values())


def _filters_zero(imp, group, index: int) -> bool:
    return all(
        imp.tensor(p.tensor).movedim(p.axis, 0)[index].abs().sum() == 0 for p in group.filters
    )


def test_zeroed_filters_regrow_after_training_steps(imported):
    _, analysis, imp = imported
    pruner = PaperSfpPruner(imp, analysis.groups, _paper(rate=0.5))
    pruner.step(1, 10)
    group = next(g for g in analysis.prunable_groups if g.layers == ("/block1/conv1/Conv",))
    first = pruner.masks[group.id].copy()
    assert all(_filters_zero(imp, group, int(i)) for i in first)
    shift = imp.tensor("block1.bn1.bias").detach().clone()
    assert (shift[first] != 0).all(), "an intermediate epoch leaves the BN shift (soft)"
    optimizer = torch.optim.SGD(imp.module.parameters(), lr=0.5)
    images = torch.from_numpy(cifar_images(count=16, size=32))
    labels = torch.arange(16) % 10
    imp.module.train()
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(imp.module(images), labels).backward()
        optimizer.step()
    grown = [int(i) for i in first if not _filters_zero(imp, group, int(i))]
    assert grown and grown == [int(i) for i in first if shift[i] > 0], "live-ReLU filters regrow"
    pruner.step(2, 10)
    assert len(pruner.masks[group.id]) == len(first)


def test_rate_schedules():
    assert [rate_at(e, 8, 0.4) for e in (1, 4, 8)] == [0.4, 0.4, 0.4]
    ramp = [rate_at(e, 8, 0.4, "asymptotic") for e in range(1, 9)]
    assert all(a < b for a, b in itertools.pairwise(ramp))
    assert ramp[1] == pytest.approx(0.3)  # 3/4 of the rate a quarter of the way through
    assert ramp[-1] == 0.4


def test_final_masks_are_what_the_surgery_removes(imported):
    model, analysis, imp = imported
    pruner = PaperSfpPruner(imp, analysis.groups, _paper(rate=0.3, criterion="fpgm"))
    pruner.step(3, 3)
    write_back(imp, model)
    removable = removable_channels(model, analysis)
    for group in analysis.prunable_groups:
        assert set(removable[group.id].tolist()) == set(pruner.masks[group.id].tolist())
    slim = clone_model(model)
    rewrite_model(slim, analysis, removable)
    feeds = [{"input": cifar_images(count=16, size=32)}]
    assert verify_models(model, slim, feeds=feeds).exact


def test_independent_layers_mode_removes_only_what_every_branch_zeroed(imported):
    """The reference code's per-layer choice: the union of kept channels goes to surgery."""
    model, analysis, imp = imported
    pruner = PaperSfpPruner(imp, analysis.groups, _paper(rate=0.5, independent_layers=True))
    pruner.step(4, 4)
    write_back(imp, model)
    removable = removable_channels(model, analysis)
    stream = next(g for g in analysis.prunable_groups if len(g.filters) == 3)
    assert set(removable[stream.id].tolist()) == set(pruner.masks[stream.id].tolist())
    assert len(pruner.masks[stream.id]) < stream.channels // 2, "branches disagree: union kept"
    single = next(g for g in analysis.prunable_groups if len(g.filters) == 1)
    assert len(removable[single.id]) == single.channels // 2
    slim = clone_model(model)
    rewrite_model(slim, analysis, removable)
    assert verify_models(model, slim, feeds=[{"input": cifar_images(count=8, size=32)}]).exact
