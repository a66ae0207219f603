"""Random small CNNs for property-based tests of the surgery: descriptions, modules, masks.

A hypothesis strategy (:func:`fuzz_cases`) draws a :class:`FuzzCase`: a CNN *description*
(:class:`NetSpec`, a list of block specs and a head), an export variant and two seeds.
:func:`build_net` turns the description into a torch module; :func:`soft_prune_net` zeroes
random channels in it the ways soft pruning and users do, some exact, some that must keep
the channel. Each block also walks itself for the independent oracle of
:mod:`tests.fuzz_oracle`, which says from the torch weights alone which shape every
Conv/Gemm of the exactly slimmed model must have.

Blocks: conv (+BN or bias) + activation; residual with identity or projection shortcut;
concat of two branches (or of the input and a branch, DenseNet-style), maybe followed by a
BN over both; depthwise separable; a 1x1 conv then a grouped 3x3 conv (2 or 4 groups, ResNeXt
style); a split along the channels into two convs and a concat, or into a GLU gate; a
conv with a GroupNorm (its channels go a norm group at a time) read by a 1x1 conv;
squeeze-and-excitation (GAP → 1x1 conv → ReLU → 1x1 conv
→ Sigmoid/HardSigmoid → Mul); max/avg pool; head: GAP or Flatten of a small map → one or
two Linear layers. Activations: ReLU, ReLU6 (Clip), SiLU, HardSwish, LeakyReLU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st
from torch import nn

from tests.exports import randomize_norms
from tests.fuzz_oracle import Flow, Oracle, bias_zero, norm_zero, rows_zero

__all__ = [
    "ACTIVATIONS",
    "BLOCK_KINDS",
    "EXPORTS",
    "WAYS",
    "ConcatSpec",
    "ConvSpec",
    "DepthwiseSpec",
    "FuzzCase",
    "FuzzNet",
    "GroupNormSpec",
    "GroupedSpec",
    "HeadSpec",
    "NetSpec",
    "PoolSpec",
    "ResidualSpec",
    "SESpec",
    "SplitSpec",
    "build_net",
    "fuzz_cases",
    "net_specs",
    "soft_prune_net",
    "zero_channels",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,  # exported as Clip(0, 6)
    "silu": nn.SiLU,  # x * Sigmoid(x)
    "hardswish": nn.Hardswish,  # HardSwish (opset 14+) or x * HardSigmoid(x)
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
}
EXPORTS = ("kept17", "fold13", "kept13", "fold17")  # legacy exporter: BN kept / folded
MAX_WIDTH = 24


# --- descriptions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvSpec:
    """Conv (k×k, stride) → BN, or a bias, or neither → activation."""

    out: int
    kernel: int
    stride: int
    act: str
    norm: str  # "bn" | "bias" | "none"


@dataclass(frozen=True)
class ResidualSpec:
    """conv3x3-BN-act → conv3x3-BN, plus the input or a 1x1 conv-BN projection; act."""

    mid: int
    out: int
    stride: int
    act: str
    projection: bool


@dataclass(frozen=True)
class ConcatSpec:
    """Concat of conv3x3-BN-act(x) and conv1x1-BN-act(x), or of x itself (``second=0``).

    With ``norm``, a BN → act follows the concatenation (DenseNet's order): one BatchNorm
    over both segments, never folded into a conv.
    """

    first: int
    second: int
    act: str
    norm: bool = False


@dataclass(frozen=True)
class DepthwiseSpec:
    """Depthwise 3x3 (stride) → BN → act → pointwise 1x1 → BN → act."""

    out: int
    stride: int
    act: str


@dataclass(frozen=True)
class GroupedSpec:
    """1x1 conv → BN → act → grouped 3x3 conv of ``groups`` groups (stride) → BN → act.

    ``mid`` and ``out`` are channels per convolution group (ResNeXt's bottleneck middle).
    """

    mid: int
    out: int
    groups: int
    stride: int
    act: str


@dataclass(frozen=True)
class SplitSpec:
    """conv3x3 → BN → act, split along the channels into ``first`` and ``second``; then
    either a conv on each piece, concatenated (split-transform-concat), or, with ``gate``,
    ``first · sigmoid(second)`` (a GLU: the pieces are joined channel by channel)."""

    first: int
    second: int
    act: str
    gate: bool


@dataclass(frozen=True)
class GroupNormSpec:
    """conv3x3 (+bias) → GroupNorm(``groups`` of ``per_group``) → act → conv1x1 → BN → act."""

    groups: int
    per_group: int
    out: int
    act: str


@dataclass(frozen=True)
class SESpec:
    """x · gate(conv1x1(ReLU(conv1x1(GAP(x))))) with a Sigmoid or HardSigmoid gate."""

    squeeze: int
    gate: str  # "sigmoid" | "hardsigmoid"


@dataclass(frozen=True)
class PoolSpec:
    """2x2 max or average pooling, stride 2."""

    kind: str  # "max" | "avg"


@dataclass(frozen=True)
class HeadSpec:
    """GAP (or Flatten of the whole small map) → [Linear → act] → Linear."""

    flatten: bool
    hidden: int | None
    act: str
    classes: int


BlockSpec = (
    ConvSpec
    | ResidualSpec
    | ConcatSpec
    | DepthwiseSpec
    | GroupedSpec
    | SplitSpec
    | SESpec
    | PoolSpec
)


@dataclass(frozen=True)
class NetSpec:
    """A whole CNN: input ``3×size×size``, the blocks in order, the head."""

    size: int
    blocks: tuple[BlockSpec, ...]
    head: HeadSpec

    def describe(self) -> str:
        """One line per block, for failure messages and the benchmark log."""
        return "\n".join(
            [f"input 3x{self.size}x{self.size}", *map(repr, self.blocks), repr(self.head)]
        )


@dataclass(frozen=True)
class FuzzCase:
    """One drawn example: the net, how it is exported, and the seeds of weights and masks."""

    spec: NetSpec
    variant: str
    weight_seed: int
    mask_seed: int


BLOCK_KINDS = {
    ConvSpec: "conv",
    ResidualSpec: "residual",
    ConcatSpec: "concat",
    DepthwiseSpec: "depthwise",
    GroupedSpec: "grouped",
    SplitSpec: "split",
    GroupNormSpec: "groupnorm",
    SESpec: "se",
    PoolSpec: "pool",
}


# --- the strategy ---------------------------------------------------------------------------
_widths = st.integers(1, MAX_WIDTH)
_acts = st.sampled_from(tuple(ACTIVATIONS))


@st.composite
def _block(draw, channels: int, spatial: int, plain: bool | None) -> tuple[BlockSpec, int, int]:
    """One block spec and the channels and spatial size after it.

    ``plain``: whether the input is one conv's output (None: the graph input). Identity
    shortcuts over the graph input or a concatenation are blocked, so they are drawn less.
    """
    pool = spatial >= 2 and plain is not None  # the net starts with a layer that has weights
    kinds = ["conv", "residual", "concat", "depthwise", "grouped", "split", "groupnorm", "se"]
    kinds += ["pool"] if pool else []
    kinds += ["residual"] if plain else []  # stacked residual blocks share one stream
    kind = draw(st.sampled_from(kinds))
    shortcuts = st.booleans() if plain else st.sampled_from((True, True, True, False))
    projection = kind == "residual" and draw(shortcuts)  # else an identity shortcut
    strided = spatial >= 2 and (kind in ("conv", "depthwise", "grouped") or projection)
    stride = draw(st.sampled_from((1, 2))) if strided else 1
    after = (spatial + 1) // 2 if stride == 2 else spatial
    if kind == "conv":
        norm = draw(st.sampled_from(("bn", "bn", "bias", "none")))
        spec = ConvSpec(draw(_widths), draw(st.sampled_from((1, 3))), stride, draw(_acts), norm)
        return spec, spec.out, after
    if kind == "residual":
        out = draw(_widths) if projection else channels
        return ResidualSpec(draw(_widths), out, stride, draw(_acts), projection), out, after
    if kind == "concat":
        second = draw(st.one_of(st.just(0), _widths))  # 0: concatenate the input itself
        spec = ConcatSpec(draw(_widths), second, draw(_acts), draw(st.booleans()))
        return spec, spec.first + (second or channels), spatial
    if kind == "depthwise":
        spec = DepthwiseSpec(draw(_widths), stride, draw(_acts))
        return spec, spec.out, after
    if kind == "grouped":
        groups = draw(st.sampled_from((2, 4)))
        per_group = st.integers(2, MAX_WIDTH // groups)  # 1 would be depthwise
        spec = GroupedSpec(draw(per_group), draw(per_group), groups, stride, draw(_acts))
        return spec, spec.out * groups, after
    if kind == "split":
        first, gate = draw(_widths), draw(st.booleans())
        second = first if gate else draw(_widths)
        return SplitSpec(first, second, draw(_acts), gate), (first if gate else 8), spatial
    if kind == "groupnorm":
        groups = draw(st.sampled_from((2, 4)))
        spec = GroupNormSpec(groups, draw(st.integers(1, 4)), draw(_widths), draw(_acts))
        return spec, spec.out, spatial
    if kind == "se":
        gate = draw(st.sampled_from(("sigmoid", "hardsigmoid")))
        return SESpec(draw(st.integers(1, 8)), gate), channels, spatial
    return PoolSpec(draw(st.sampled_from(("max", "avg")))), channels, spatial // 2


@st.composite
def net_specs(draw, sizes: Sequence[int] = (8, 16), max_blocks: int = 5) -> NetSpec:
    """A random small CNN description (see the module docstring for the block kinds)."""
    size = draw(st.sampled_from(tuple(sizes)))
    channels, spatial, plain, blocks = 3, size, None, []
    for _ in range(draw(st.integers(min(2, max_blocks), max_blocks))):
        spec, channels, spatial = draw(_block(channels, spatial, plain))
        blocks.append(spec)
        creates = ConvSpec | DepthwiseSpec | GroupedSpec | SplitSpec | GroupNormSpec | ConcatSpec
        if isinstance(spec, creates) or (isinstance(spec, ResidualSpec) and spec.projection):
            plain = not isinstance(spec, ConcatSpec)
    flatten = spatial <= 8 and draw(st.booleans())
    hidden = draw(st.one_of(st.none(), _widths))
    head = HeadSpec(flatten, hidden, draw(_acts), draw(st.integers(2, 10)))
    return NetSpec(size=size, blocks=tuple(blocks), head=head)


def fuzz_cases(variants: Sequence[str] = EXPORTS, **spec_options) -> st.SearchStrategy[FuzzCase]:
    """Nets, export variants and seeds (``spec_options`` go to :func:`net_specs`)."""
    seeds = st.integers(0, 2**31 - 1)
    return st.builds(
        FuzzCase,
        spec=net_specs(**spec_options),
        variant=st.sampled_from(tuple(variants)),
        weight_seed=seeds,
        mask_seed=seeds,
    )


# --- torch blocks ---------------------------------------------------------------------------
class ConvUnit(nn.Module):
    """conv → [BN] → [act]; a producer of channels (or, depthwise, of its input's)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, act: str | None, norm: str,
                 depthwise: bool = False, groups: int = 1,
                 split_at: int | None = None) -> None:  # fmt: skip
        super().__init__()
        groups = cin if depthwise else groups
        self.split_at = split_at  # the output is read as two pieces: two spaces
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=norm == "bias")
        self.norm = nn.BatchNorm2d(cout) if norm == "bn" else None
        self.act = ACTIVATIONS[act]() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.norm(x) if self.norm is not None else x
        return self.act(x) if self.act is not None else x

    def track(self, o: Oracle, x: Flow | None) -> Flow:
        """Record the conv (a reader and a producer, or depthwise a pass-through)."""
        w, b = self.conv.weight, self.conv.bias
        zero = rows_zero(w) & bias_zero(b, w.shape[0])
        groups = self.conv.groups
        if groups == 1 or x is None:
            if x is not None:
                o.reads.append(x)
            # a depthwise conv over an untracked input blocks its own channels in sfp-onnx
            space = o.new(w.shape[0], blocked=groups != 1 and w.shape[1] == 1)
            out = Flow(((space, w.shape[0]),), zero)
            if self.split_at:
                cut = self.split_at
                space = (o.new(cut), o.new(w.shape[0] - cut))
                out = Flow(((space[0], cut), (space[1], w.shape[0] - cut)), zero)
            o.layers.append(("Conv", x, space, tuple(w.shape)))
        elif w.shape[1] > 1:  # grouped: each group of the input and output loses equally
            o.reads.append(x)
            o.split_into_parts(x, w.shape[1])
            space = o.new(w.shape[0])
            o.split_into_parts(Flow(((space, w.shape[0]),), zero), w.shape[0] // groups)
            out = Flow(((space, w.shape[0]),), zero)
            o.layers.append(("Conv", x, space, tuple(w.shape), groups))
        else:
            out = Flow(x.segments, (x.zero | rows_zero(w)) & bias_zero(b, w.shape[0]))
            o.layers.append(("Conv", x, None, tuple(w.shape)))
        o.producers.append((out.segments, self))
        if self.norm is not None:
            out.zero = norm_zero(self.norm, out.zero)
        return out


def _unit(cin: int, spec: ConvSpec) -> ConvUnit:
    return ConvUnit(cin, spec.out, spec.kernel, spec.stride, spec.act, spec.norm)


class Residual(nn.Module):
    """:class:`ResidualSpec`: the shortcut's Add joins the body's channels to the stream."""

    def __init__(self, cin: int, spec: ResidualSpec) -> None:
        super().__init__()
        self.body1 = ConvUnit(cin, spec.mid, 3, spec.stride, spec.act, "bn")
        self.body2 = ConvUnit(spec.mid, spec.out, 3, 1, None, "bn")
        self.shortcut = (
            ConvUnit(cin, spec.out, 1, spec.stride, None, "bn") if spec.projection else None
        )
        self.act = ACTIVATIONS[spec.act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body2(self.body1(x))
        return self.act(y + (self.shortcut(x) if self.shortcut is not None else x))

    def track(self, o: Oracle, x: Flow | None) -> Flow | None:
        y = self.body2.track(o, self.body1.track(o, x))
        s = self.shortcut.track(o, x) if self.shortcut is not None else x
        return o.join([y, s], None if s is None else y.zero & s.zero)


class NormUnit(nn.Module):
    """BN → act on its own (after a concatenation); it shifts channels, creates none."""

    def __init__(self, channels: int, act: str) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.act = ACTIVATIONS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(x))

    def track(self, o: Oracle, x: Flow | None) -> Flow | None:
        """Record the BN as a producer of its input's channels; zero stays zero only where
        its mean and shift are zero, or its scale and shift."""
        if x is None:
            return None
        o.producers.append((x.segments, self))
        return Flow(x.segments, norm_zero(self.norm, x.zero))


class Concat(nn.Module):
    """:class:`ConcatSpec`: the output's channels are the two branches' segments."""

    def __init__(self, cin: int, spec: ConcatSpec) -> None:
        super().__init__()
        self.first = ConvUnit(cin, spec.first, 3, 1, spec.act, "bn")
        self.second = ConvUnit(cin, spec.second, 1, 1, spec.act, "bn") if spec.second else None
        width = spec.first + (spec.second or cin)
        self.post = NormUnit(width, spec.act) if spec.norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.first(x), self.second(x) if self.second is not None else x], 1)
        return self.post(y) if self.post is not None else y

    def track(self, o: Oracle, x: Flow | None) -> Flow | None:
        a = self.first.track(o, x)
        b = self.second.track(o, x) if self.second is not None else x
        if b is None:
            o.block(a)
            return None
        y = Flow(a.segments + b.segments, np.concatenate([a.zero, b.zero]))
        return self.post.track(o, y) if self.post is not None else y


class Depthwise(nn.Module):
    """:class:`DepthwiseSpec`: the depthwise conv carries its input's channels through."""

    def __init__(self, cin: int, spec: DepthwiseSpec) -> None:
        super().__init__()
        self.dw = ConvUnit(cin, cin, 3, spec.stride, spec.act, "bn", depthwise=True)
        self.pw = ConvUnit(cin, spec.out, 1, 1, spec.act, "bn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))

    def track(self, o: Oracle, x: Flow | None) -> Flow:
        return self.pw.track(o, self.dw.track(o, x))


class Grouped(nn.Module):
    """:class:`GroupedSpec`: a 1x1 conv, then a grouped 3x3 conv reading it group by group."""

    def __init__(self, cin: int, spec: GroupedSpec) -> None:
        super().__init__()
        mid, out = spec.mid * spec.groups, spec.out * spec.groups
        self.reduce = ConvUnit(cin, mid, 1, 1, spec.act, "bn")
        self.grouped = ConvUnit(mid, out, 3, spec.stride, spec.act, "bn", groups=spec.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped(self.reduce(x))

    def track(self, o: Oracle, x: Flow | None) -> Flow:
        return self.grouped.track(o, self.reduce.track(o, x))


class Split(nn.Module):
    """:class:`SplitSpec`: each piece of the split is its own space (joined again by a gate)."""

    def __init__(self, cin: int, spec: SplitSpec) -> None:
        super().__init__()
        self.spec = spec
        width = spec.first + spec.second
        self.unit = ConvUnit(cin, width, 3, 1, spec.act, "bn", split_at=spec.first)
        if not spec.gate:
            self.left = ConvUnit(spec.first, 4, 1, 1, spec.act, "bn")
            self.right = ConvUnit(spec.second, 4, 3, 1, spec.act, "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.unit(x), [self.spec.first, self.spec.second], dim=1)
        if self.spec.gate:
            return a * torch.sigmoid(b)
        return torch.cat([self.left(a), self.right(b)], dim=1)

    def track(self, o: Oracle, x: Flow | None) -> Flow | None:
        y = self.unit.track(o, x)
        cut = self.spec.first
        a, b = Flow(y.segments[:1], y.zero[:cut]), Flow(y.segments[1:], y.zero[cut:])
        if self.spec.gate:  # sigmoid(b) is never zero: a · sigmoid(b) is zero where a is
            return o.join([a, b], a.zero.copy())
        left, right = self.left.track(o, a), self.right.track(o, b)
        return Flow(left.segments + right.segments, np.concatenate([left.zero, right.zero]))


class GroupNormUnit(nn.Module):
    """:class:`GroupNormSpec`: the conv's channels go a norm group at a time (units of
    ``per_group``), read by a plain 1x1 conv."""

    def __init__(self, cin: int, spec: GroupNormSpec) -> None:
        super().__init__()
        width = spec.groups * spec.per_group
        self.conv = nn.Conv2d(cin, width, 3, 1, 1)
        self.norm = nn.GroupNorm(spec.groups, width)
        self.unit = spec.per_group  # zero_channels: positions are norm groups
        self.act = ACTIVATIONS[spec.act]()
        self.pw = ConvUnit(width, spec.out, 1, 1, spec.act, "bn")
        with torch.no_grad():  # not the identity, so zeroing the scale alone is not enough
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.act(self.norm(self.conv(x))))

    def track(self, o: Oracle, x: Flow | None) -> Flow:
        w, b, u = self.conv.weight, self.conv.bias, self.unit
        if x is not None:
            o.reads.append(x)
        space = o.new(self.norm.num_groups)
        o.layers.append(("Conv", x, ("units", space, u), tuple(w.shape)))

        def per_group(zero: np.ndarray) -> np.ndarray:
            return zero.reshape(-1, u).all(axis=1)

        inputs = per_group(rows_zero(w) & bias_zero(b, w.shape[0]))
        scale, shift = (p.detach().numpy() == 0 for p in (self.norm.weight, self.norm.bias))
        zero = (per_group(scale) | inputs) & per_group(shift)
        out = Flow(((space, self.norm.num_groups),), zero, block=u)
        o.producers.append((out.segments, self))
        return self.pw.track(o, out)


class SqueezeExcite(nn.Module):
    """:class:`SESpec`: the gate's Mul joins the expand conv's channels to the input's."""

    def __init__(self, cin: int, spec: SESpec) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = ConvUnit(cin, spec.squeeze, 1, 1, "relu", "bias")
        self.expand = ConvUnit(spec.squeeze, cin, 1, 1, None, "bias")
        self.gate = nn.Sigmoid() if spec.gate == "sigmoid" else nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.reduce(self.pool(x))))

    def track(self, o: Oracle, x: Flow | None) -> Flow | None:
        g = self.expand.track(o, self.reduce.track(o, x))
        # the gate maps 0 to 0.5: never zero; x·g is zero where x is
        return o.join([x, g], None if x is None else x.zero.copy())


class Pool(nn.Module):
    """:class:`PoolSpec`: channels pass through."""

    def __init__(self, cin: int, spec: PoolSpec) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2) if spec.kind == "max" else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)

    def track(self, o: Oracle, x: Flow | None) -> Flow | None:
        return x


class Head(nn.Module):
    """:class:`HeadSpec`: after a Flatten each channel spans H×W input columns of the Linear."""

    def __init__(self, cin: int, spatial: int, spec: HeadSpec) -> None:
        super().__init__()
        self.flatten = spec.flatten
        self.map = spatial * spatial if spec.flatten else 1
        features = cin * self.map
        self.hidden = nn.Linear(features, spec.hidden) if spec.hidden else None
        self.act = ACTIVATIONS[spec.act]()
        self.out = nn.Linear(spec.hidden or features, spec.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.flatten:
            x = nn.functional.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        if self.hidden is not None:
            x = self.act(self.hidden(x))
        return self.out(x)

    def track(self, o: Oracle, x: Flow | None) -> None:
        if x is not None:
            x = Flow(x.segments, x.zero, x.block * self.map)
        for linear in (self.hidden, self.out):
            if linear is None:
                continue
            if x is not None:
                o.reads.append(x)
            space = o.new(linear.out_features, blocked=linear is self.out)  # graph output
            o.layers.append(("Gemm", x, space, tuple(linear.weight.shape)))
            o.producers.append((((space, linear.out_features),), linear))
            x = Flow(((space, linear.out_features),), rows_zero(linear.weight) & bias_zero(
                linear.bias, linear.out_features))  # fmt: skip


_BLOCKS: dict[type, type[nn.Module]] = {
    ConvSpec: lambda cin, spec: _unit(cin, spec),
    ResidualSpec: Residual,
    ConcatSpec: Concat,
    DepthwiseSpec: Depthwise,
    GroupedSpec: Grouped,
    SplitSpec: Split,
    GroupNormSpec: GroupNormUnit,
    SESpec: SqueezeExcite,
    PoolSpec: Pool,
}


class FuzzNet(nn.Module):
    """The torch module of a :class:`NetSpec`."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        channels, x = 3, torch.zeros(1, 3, spec.size, spec.size)
        blocks = []
        for block_spec in spec.blocks:
            block = _BLOCKS[type(block_spec)](channels, block_spec)
            with torch.no_grad():
                x = block.eval()(x)
            channels = x.shape[1]
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(channels, x.shape[-1], spec.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def trace(self) -> Oracle:
        """Walk the blocks in forward order, from the current weights."""
        o = Oracle()
        x: Flow | None = Flow(((o.new(3, blocked=True), 3),), np.zeros(3, dtype=bool))
        for block in self.blocks:
            x = block.track(o, x)
        self.head.track(o, x)
        return o


def build_net(spec: NetSpec, seed: int = 0) -> FuzzNet:
    """The torch module of ``spec``, seeded weights, random BN statistics, eval mode."""
    torch.manual_seed(seed)
    return randomize_norms(FuzzNet(spec), seed=seed)


# --- soft pruning in torch ------------------------------------------------------------------
# How a producer's chosen channels are zeroed:
#   sfp: conv row, bias, BN running mean and shift (BN scale kept): exactly zero;
#   norm: BN scale and shift: exactly zero (a folded export makes the conv row zero);
#   row: the conv/linear row and its bias: zero unless a BN follows and adds a constant;
#   row_only: the row alone: zero only when there is neither a bias nor a BN;
#   scale: the BN scale alone: the BN still adds its shift;
#   no_mean: row, bias and BN shift, not the mean: the BN adds -scale·mean/σ;
#   none: this producer leaves the channels alone (another branch may still use them).
WAYS = ("sfp", "norm", "row", "row_only", "scale", "no_mean", "none")  # exact ones first
_NORM_PARAMS = {
    "sfp": ("running_mean", "bias"),
    "norm": ("weight", "bias"),
    "scale": ("weight",),
    "no_mean": ("bias",),
}


def zero_channels(module: nn.Module, positions: Sequence[int], way: str) -> None:
    """Zero output channels ``positions`` of a :class:`ConvUnit`, :class:`NormUnit` or Linear
    the way ``way`` says (:data:`WAYS`)."""
    conv = module if isinstance(module, nn.Linear) else getattr(module, "conv", None)
    norm = getattr(module, "norm", None)
    unit = getattr(module, "unit", 1)  # a GroupNorm's positions are whole norm groups
    positions = np.asarray(positions, dtype=np.int64)
    idx = torch.as_tensor((positions[:, None] * unit + np.arange(unit)).reshape(-1))
    if conv is not None and way in ("sfp", "row", "row_only", "no_mean"):
        conv.weight[idx] = 0
        if conv.bias is not None and way != "row_only":
            conv.bias[idx] = 0
    for name in _NORM_PARAMS.get(way, ()) if norm is not None else ():
        if getattr(norm, name, None) is not None:  # a GroupNorm has no running mean
            getattr(norm, name)[idx] = 0


def _has_norm(module: nn.Module) -> bool:
    return getattr(module, "norm", None) is not None


def soft_prune_net(net: FuzzNet, seed: int) -> dict[str, int]:
    """Zero random channels of random groups; in place.

    Channels are chosen per group (spaces joined by Add/Mul, :meth:`FuzzNet.trace`) and
    every producer of the group zeroes them exactly (``sfp`` or ``norm``), so coupled
    branches agree and the channels go — except, in about half the groups, one producer
    that draws another of :data:`WAYS`: a branch that keeps the channels or a BN that still
    adds a constant, so they must stay.

    Returns:
        How many (producer, group) pairs each way zeroed.
    """
    rng = np.random.default_rng(seed)
    oracle = net.trace()
    pairs = [  # (producer, offset of the segment in it, group)
        (module, start, oracle.find(space))
        for segments, module in oracle.producers
        for (space, _), start in zip(
            segments, np.cumsum([0] + [n for _, n in segments]), strict=False
        )
    ]
    chosen, trap = {}, {}
    for root in oracle.roots():
        if rng.random() < 0.85:
            size = oracle.size[root]
            count = max(1, int(rng.choice([0.25, 0.5, 0.75, 1.0]) * size))
            chosen[root] = np.sort(rng.choice(size, count, replace=False))
            members = [i for i, (_, _, group) in enumerate(pairs) if group == root]
            if members and rng.random() < 0.5:
                trap[root] = int(rng.choice(members))
    used = dict.fromkeys(WAYS, 0)
    with torch.no_grad():
        for i, (module, start, root) in enumerate(pairs):
            if root not in chosen:
                continue
            exact = ("sfp", "norm") if _has_norm(module) else ("sfp",)
            way = str(rng.choice(WAYS[2:] if trap.get(root) == i else exact))
            zero_channels(module, int(start) + chosen[root], way)
            used[way] += 1
    return used
