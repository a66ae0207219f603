"""`slim`: remove channels zeroed in torch before export — exactly those, and exactly.

Graph case: a small ResNet (stem, two identity-shortcut blocks, one projection block,
GAP → Flatten → Linear). Channels of the residual stream are zeroed across the whole stage
(stem and every block's last BN), one channel only in one branch (the union keeps it), and
an inner channel whose conv row is zero but whose BN still adds a constant (must stay).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import sfp_onnx
from sfp_onnx.runtime.session import create_session
from tests.exports import (
    ChannelSplitNet,
    DepthwiseMultiplierNet,
    GroupedNet,
    GroupNormNet,
    ResidualNet,
    cifar_images,
    export,
    randomize_norms,
)


def _zero_bn(bn: torch.nn.BatchNorm2d, channels: list[int]) -> None:
    bn.weight.data[channels] = 0
    bn.bias.data[channels] = 0


def _soft_pruned_net() -> ResidualNet:
    torch.manual_seed(0)
    net = randomize_norms(ResidualNet(width=8))
    with torch.no_grad():
        stream = [1, 5]  # zeroed in every producer of the stage-1 residual stream
        for bn in (net.stem[1], net.block1.bn2, net.block2.bn2):
            _zero_bn(bn, stream)
        _zero_bn(net.block1.bn2, [3])  # only one branch: channel 3 is still used elsewhere
        _zero_bn(net.block1.bn1, [0, 2, 4])  # inner channels of block1
        net.block2.conv1.weight[6] = 0  # conv row zero, but its BN adds a constant: keep
        _zero_bn(net.down.bn1, list(range(0, 16, 2)))  # half of the projection block's inner
    return net


def _conv_weights(path) -> dict[str, tuple[int, ...]]:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "Gemm")}


@pytest.mark.parametrize("variant", ["kept17", "fold13", "dynamo"])
def test_slim_removes_exactly_the_zeroed_channels(tmp_path, variant):
    source = export(_soft_pruned_net(), tmp_path / "net.onnx", variant, size=32)
    out = tmp_path / "slim.onnx"

    result = sfp_onnx.slim(source, out)

    assert list(_conv_weights(out).values()) == [
        (6, 3, 3, 3),  # stem: stream channels 1 and 5 go (zeroed in every branch)
        (5, 6, 3, 3),  # block1.conv1: inner channels 0, 2, 4 go
        (6, 5, 3, 3),  # block1.conv2: channel 3 stays, the other branches still use it
        (8, 6, 3, 3),  # block2.conv1: channel 6 stays, its BN adds a constant
        (6, 8, 3, 3),  # block2.conv2
        (8, 6, 3, 3),  # down.conv1: half of the inner channels go
        (16, 8, 3, 3),  # down.conv2
        (16, 6, 1, 1),  # down.shortcut reads the slimmed stream
        (10, 16),  # head: the graph output keeps its width
    ]
    images = cifar_images(count=16, size=32)
    y_ref = create_session(source, provider="cpu").run(None, {"input": images})[0]
    y_slim = create_session(out, provider="cpu").run(None, {"input": images})[0]
    assert np.abs(y_ref - y_slim).max() <= 1e-4 * np.abs(y_ref).max()
    assert sorted(g.kept for g in result.groups if g.kept < g.channels) == [5, 6, 8]


def test_slim_of_an_unpruned_model_changes_nothing(tmp_path):
    torch.manual_seed(0)
    source = export(randomize_norms(ResidualNet(width=8)), tmp_path / "net.onnx", "kept17", 32)
    out = tmp_path / "slim.onnx"
    result = sfp_onnx.slim(source, out)
    assert result.after.macs == result.before.macs
    assert _conv_weights(out) == _conv_weights(source)


def test_slim_keeps_one_channel_of_a_fully_zeroed_group(tmp_path):
    torch.manual_seed(0)
    net = randomize_norms(ResidualNet(width=8))
    _zero_bn(net.block1.bn1, list(range(8)))
    source = export(net, tmp_path / "net.onnx", "kept17", 32)
    out = tmp_path / "slim.onnx"
    sfp_onnx.slim(source, out)
    widths = sorted(s[0] for s in _conv_weights(out).values())
    assert widths[0] == 1


@pytest.mark.parametrize("criterion", ["l2", "fpgm"])
def test_prune_chooses_the_same_channels_with_bn_kept_or_folded(tmp_path, criterion):
    """Filters are scored with their BatchNorm folded in, so both exports prune alike."""
    torch.manual_seed(0)
    net = randomize_norms(ResidualNet(width=16))
    kept = export(net, tmp_path / "kept.onnx", "kept17", size=32)
    folded = export(net, tmp_path / "folded.onnx", "fold17", size=32)
    for source in (kept, folded):
        sfp_onnx.prune(source, source.with_suffix(".slim.onnx"), rate=0.4, criterion=criterion)
    images = cifar_images(count=16, size=32)
    outputs = [
        create_session(p.with_suffix(".slim.onnx"), provider="cpu").run(None, {"input": images})[0]
        for p in (kept, folded)
    ]
    assert np.abs(outputs[0] - outputs[1]).max() <= 1e-4 * np.abs(outputs[0]).max()


class _Decoder(torch.nn.Module):
    """Only transposed convolutions (with BN and ReLU): a decoder-style net."""

    def __init__(self) -> None:
        super().__init__()
        t = torch.nn.ConvTranspose2d
        self.body = torch.nn.Sequential(
            t(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            t(16, 24, 4, stride=2, padding=1), torch.nn.BatchNorm2d(24), torch.nn.ReLU(),
            t(24, 3, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("variant", ["kept17", "fold13", "dynamo"])
def test_convtranspose_only_graphs_are_pruned_exactly(tmp_path, variant):
    """No Conv at all: the transposed convs' output channels (weight axis 1) are pruned."""
    torch.manual_seed(0)
    path = export(randomize_norms(_Decoder()), tmp_path / "decoder.onnx", variant, size=16)
    report = sfp_onnx.prune(path, tmp_path / "slim.onnx", rate=0.3, round_to=None)
    assert report.verification.exact
    kept = sorted((g.channels, g.kept) for g in report.groups if g.prunable)
    assert kept == [(16, 12), (24, 17)]
    assert report.macs_reduction > 0.4


@pytest.mark.parametrize("variant", ["kept17", "fold13", "dynamo"])
def test_a_depthwise_conv_with_a_multiplier_is_pruned_exactly(tmp_path, variant):
    """groups = C_in, C_out = 2·C_in: removing input channel c removes its two outputs, and
    ``group`` shrinks with the channels."""
    torch.manual_seed(0)
    net = randomize_norms(DepthwiseMultiplierNet(width=8))
    path = export(net, tmp_path / "multiplier.onnx", variant, size=16)
    report = sfp_onnx.prune(path, tmp_path / "slim.onnx", rate=0.3, round_to=None)
    assert report.verification.exact
    assert sorted((g.channels, g.kept) for g in report.groups if g.prunable) == [(8, 6), (12, 9)]
    slim = onnx.load(str(tmp_path / "slim.onnx"))
    inits = {t.name: numpy_helper.to_array(t).shape for t in slim.graph.initializer}
    depthwise = [n for n in slim.graph.node if n.op_type == "Conv" and inits[n.input[1]][1] == 1]
    assert len(depthwise) == 1
    group = next(a.i for a in depthwise[0].attribute if a.name == "group")
    assert (group, inits[depthwise[0].input[1]][0]) == (6, 12)  # 6 inputs, 2 outputs each
    assert report.macs_reduction > 0.3


@pytest.mark.parametrize("variant", ["kept17", "fold13", "dynamo"])
def test_grouped_convs_lose_the_same_count_in_every_group(tmp_path, variant):
    """groups=4 and groups=2 convs: every convolution group keeps the same width, so
    ``group`` is unchanged and the weights stay [C_out, C_in/G, k, k]."""
    torch.manual_seed(0)
    net = randomize_norms(GroupedNet(width=16))
    path = export(net, tmp_path / "grouped.onnx", variant, size=16)
    report = sfp_onnx.prune(path, tmp_path / "slim.onnx", rate=0.3, round_to=None)
    assert report.verification.exact
    kept = sorted((g.channels, g.kept) for g in report.groups if g.prunable)
    # residual stream 16 (read by the groups=2 conv: 2 parts of 8, 6 kept in each), the
    # reduce output (4 parts of 4: 3 kept each), the grouped output (3 of 4 per part) and the
    # widened 24 (2 parts of 12: 9 kept each)
    assert kept == [(16, 12), (16, 12), (16, 12), (24, 18)]
    slim = onnx.load(str(tmp_path / "slim.onnx"))
    inits = {t.name: numpy_helper.to_array(t).shape for t in slim.graph.initializer}
    grouped = {
        next(a.i for a in n.attribute if a.name == "group"): inits[n.input[1]]
        for n in slim.graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    }
    assert grouped == {4: (12, 3, 3, 3), 2: (18, 6, 3, 3)}
    assert report.macs_reduction > 0.4


@pytest.mark.parametrize("round_to", [4, 8])
def test_grouped_rounding_keeps_a_multiple_of_both(tmp_path, round_to):
    """Kept widths are multiples of lcm(K, groups); a group that cannot meet both stays whole."""
    torch.manual_seed(0)
    path = export(randomize_norms(GroupedNet(width=16)), tmp_path / "grouped.onnx", size=16)
    report = sfp_onnx.prune(path, tmp_path / "slim.onnx", rate=0.3, round_to=round_to)
    assert report.verification.exact
    for group in report.groups:
        if group.prunable:
            assert group.kept % round_to == 0


@pytest.mark.parametrize("variant", ["kept17", "kept13", "dynamo"])
@pytest.mark.parametrize(
    ("kind", "kept"),
    [
        # the GLU's halves are one group of 8 (6 kept); its body 12 -> 9
        ("glu", [(8, 6), (12, 9)]),
        # the pieces 6 and 10 of the stem, the two branch convs, the body
        ("branches", [(6, 5), (8, 6), (8, 6), (10, 7), (12, 9)]),
        # the stem's channels before, inside and after the slice [4, 12)
        ("slice", [(4, 3), (4, 3), (8, 6), (12, 9)]),
    ],
)
def test_channel_splits_and_slices_are_pruned_exactly(tmp_path, variant, kind, kept):
    """A Split or Slice along the channels makes each piece its own group; the sizes,
    starts and ends shrink with the channels before them."""
    torch.manual_seed(0)
    net = randomize_norms(ChannelSplitNet(kind))
    path = export(net, tmp_path / f"{kind}.onnx", variant, size=16)
    report = sfp_onnx.prune(path, tmp_path / "slim.onnx", rate=0.3, round_to=None)
    assert report.verification.exact
    assert sorted((g.channels, g.kept) for g in report.groups if g.prunable) == kept
    assert report.macs_reduction > 0.3


@pytest.mark.parametrize("variant", ["kept17", "kept13", "dynamo", "dynamo23"])
def test_group_norm_loses_whole_groups(tmp_path, variant):
    """GroupNorm (exported as Reshape → InstanceNormalization → Reshape → Mul → Add, or at
    opset 23 as GroupNormalization-21): its statistics span a group, so the channels of a
    group go together and G shrinks."""
    torch.manual_seed(0)
    path = export(GroupNormNet(width=16), tmp_path / "gn.onnx", variant, size=16)
    result = sfp_onnx.analyze(path)
    prunable = [g for g in result.groups if g.prunable]
    assert sorted(g.channels for g in prunable) == [4, 4]  # 4 groups of 4 channels each
    out = tmp_path / "slim.onnx"
    report = sfp_onnx.prune(path, out, rate=0.3, round_to=None)
    assert report.verification.exact
    assert sorted(g.kept for g in report.groups if g.prunable) == [3, 3]
    weights = _conv_weights(out)
    assert sorted(shape[0] for shape in weights.values()) == [10, 12, 12, 12]
    assert report.macs_reduction > 0.3
    slim = onnx.load(str(out))
    norms = [n for n in slim.graph.node if n.op_type == "GroupNormalization"]
    if variant == "dynamo23":
        assert [a.i for n in norms for a in n.attribute if a.name == "num_groups"] == [3, 3, 3]
    else:
        assert not norms


class _FlattenNorm(torch.nn.Module):
    """conv → BN → ReLU → Flatten → BatchNorm1d → Linear: a norm over the flattened features."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(), torch.nn.Flatten(),
        )  # fmt: skip
        self.norm = torch.nn.BatchNorm1d(8 * 8 * 8)
        self.head = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x)))


@pytest.mark.parametrize("variant", ["kept17", "dynamo"])
def test_a_norm_over_flattened_features_is_sliced_with_the_channels(tmp_path, variant):
    """Each conv channel spans 64 features of the BatchNorm1d: they go with the channel."""
    torch.manual_seed(0)
    path = export(randomize_norms(_FlattenNorm()), tmp_path / "flat.onnx", variant, size=16)
    report = sfp_onnx.prune(path, tmp_path / "slim.onnx", rate=0.3, round_to=None)
    assert report.verification.exact
    assert [(g.channels, g.kept) for g in report.groups if g.prunable] == [(8, 6)]
