"""Soft pruning with masks in the forward pass: what the network trains is what is written.

Graph cases: the small ResidualNet (a stem, two residual blocks, a projection shortcut) exported
with BN kept (opset 17), BN folded (opset 17) and by the dynamo exporter, imported with
onnx2torch and fine-tuned on real CIFAR-10 images with :class:`SoftMaskPruner` as the hook of
the real training loop. Every test that prunes ends with the onnxruntime exactness check.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sfp_onnx.data.datasets import DataConfig, load_datasets
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.load import clone_model, load_model
from sfp_onnx.graph.rewrite import rewrite_model
from sfp_onnx.graph.soft_prune import score_group, scoring_tensors
from sfp_onnx.graph.zeros import removable_channels
from sfp_onnx.runtime.verify import verify_models
from sfp_onnx.training.channels import favour_kept
from sfp_onnx.training.feature_match import FeatureMatch, bounded_gap
from sfp_onnx.training.hooks import TrainingHook
from sfp_onnx.training.import_torch import import_model, write_back
from sfp_onnx.training.norms import InsertedNorms
from sfp_onnx.training.objectives import (
    Distillation,
    DistillConfig,
    auto_feature_weight,
    distillation_term,
    resolve_features,
)
from sfp_onnx.training.sfp import SfpConfig
from sfp_onnx.training.soft_masks import SoftMaskPruner, selection_steps
from sfp_onnx.training.train import TrainConfig, train
from tests.exports import (
    DepthwiseMultiplierNet,
    ResidualNet,
    cifar_images,
    export,
    randomize_norms,
)

CONFIG = TrainConfig(epochs=2, batch_size=32, lr=0.05, workers=0, seed=0)
SOFT = SfpConfig(rate=0.5, reselect_every=2, freeze=0.25, round_to=None)


@pytest.fixture(scope="module")
def data(cifar10_root: Path):
    config = DataConfig("cifar10", str(cifar10_root), train_limit=192, eval_limit=64, seed=0)
    return load_datasets(config, (32, 32))


def _imported(tmp_path: Path, variant: str = "kept17"):
    torch.manual_seed(0)
    path = export(randomize_norms(ResidualNet(width=8)), tmp_path / "net.onnx", variant, 32)
    model = load_model(path)
    return path, model, analyze_model(model), import_model(model)


class _Recorder(TrainingHook):
    """Records, after every step, the gate factors the next forward pass will use."""

    name = "recorder"

    def __init__(self, pruner: SoftMaskPruner) -> None:
        self.pruner = pruner
        self.masks: list[dict[int, set[int]]] = []

    def after_step(self, step: int) -> None:
        self.masks.append({g: set(m.tolist()) for g, m in self.pruner.masks.items()})


def _gated_zero(pruner: SoftMaskPruner, group) -> set[int]:
    """Channels whose gate is 0 at every site of ``group``, read off the gates themselves."""
    zero = None
    for factor in pruner.gates.factors(group.id):
        now = {int(i) for i in torch.nonzero(factor == 0).flatten()}
        zero = now if zero is None else zero & now
    return zero or set()


def _slim_exact(model, analysis, removable) -> bool:
    slim = clone_model(model)
    rewrite_model(slim, analysis, removable)
    return verify_models(model, slim, feeds=[{"input": cifar_images(count=16, size=32)}]).exact


@pytest.mark.parametrize(
    ("variant", "criterion"),
    [("kept17", "l2"), ("fold17", "l2"), ("dynamo", "l2"), ("kept17", "taylor")],
)
def test_trained_masks_are_what_the_surgery_removes(
    data, tmp_path: Path, variant: str, criterion: str
) -> None:
    """Masks of the last training step == gates at zero == what the surgery removes; exact."""
    _, model, analysis, imp = _imported(tmp_path, variant)
    pruner = SoftMaskPruner(imp, model, analysis, replace(SOFT, criterion=criterion))
    recorder = _Recorder(pruner)
    train(imp.module, data.train, None, CONFIG, workdir=tmp_path / "w", hooks=[pruner, recorder])
    last = recorder.masks[-1]
    for group in pruner.groups:
        assert _gated_zero(pruner, group) == last[group.id]
        assert len(last[group.id]) == group.channels // 2
    imp.module.eval()
    images = torch.from_numpy(cifar_images(count=16, size=32))
    with torch.no_grad():
        before = imp.module(images)
    pruner.finish()
    with torch.no_grad():
        after = imp.module(images)
    assert torch.equal(before, after), "the exact zeroing changes nothing the network computed"
    write_back(imp, model)
    removable = removable_channels(model, analysis)
    for group in pruner.groups:
        assert set(removable[group.id].tolist()) == last[group.id]
    assert _slim_exact(model, analysis, removable)


def test_masks_through_a_depthwise_multiplier_train_and_write_exactly(data, tmp_path) -> None:
    """A channel masked before a depthwise conv with multiplier 2 gates both its outputs (the
    pointwise conv reads blocks of 2); what the surgery removes is exactly the masks."""
    torch.manual_seed(0)
    net = randomize_norms(DepthwiseMultiplierNet(width=8))
    model = load_model(export(net, tmp_path / "net.onnx", "kept17", 32))
    analysis, imp = analyze_model(model), import_model(model)
    pruner = SoftMaskPruner(imp, model, analysis, SOFT)
    train(imp.module, data.train, None, CONFIG, workdir=tmp_path / "w", hooks=[pruner])
    masks = {g.id: set(pruner.masks[g.id].tolist()) for g in pruner.groups}
    assert sorted(len(m) for m in masks.values()) == [4, 6]  # half of 8 and of 12
    imp.module.eval()
    images = torch.from_numpy(cifar_images(count=16, size=32))
    with torch.no_grad():
        before = imp.module(images)
        pruner.finish()
        after = imp.module(images)
    assert torch.equal(before, after)
    write_back(imp, model)
    removable = removable_channels(model, analysis)
    assert {g: set(removable[g].tolist()) for g in masks} == masks
    assert _slim_exact(model, analysis, removable)


def test_training_mode_output_unchanged_by_the_exact_zeroing(data, tmp_path: Path) -> None:
    """Train-mode BatchNorm (batch statistics) gives the same output before and after."""
    _, model, analysis, imp = _imported(tmp_path)
    pruner = SoftMaskPruner(imp, model, analysis, SOFT)
    train(imp.module, data.train, None, CONFIG, workdir=tmp_path / "w", hooks=[pruner])
    images = torch.from_numpy(cifar_images(count=16, size=32))
    norms = [m for m in imp.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [n.momentum for n in norms]
    for norm in norms:
        norm.momentum = 0.0  # train-mode forwards that leave the running statistics alone
    imp.module.train()
    with torch.no_grad():
        before = imp.module(images)
        pruner.finish()
        after = imp.module(images)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    assert (before - after).abs().max() <= 1e-5 * before.abs().max()


def test_a_masked_channel_comes_back_when_its_score_grows(tmp_path: Path) -> None:
    """Re-selection is soft: a masked filter that grows is unmasked, the weakest kept one goes."""
    _, model, analysis, imp = _imported(tmp_path)
    config = replace(SOFT, schedule="constant", reselect_every=1, freeze=0.5)
    pruner = SoftMaskPruner(imp, model, analysis, config)
    pruner.start(steps_per_epoch=10, epochs=1)
    group = next(g for g in pruner.groups if g.layers == ("/block1/conv1/Conv",))
    masked = sorted(pruner.masks[group.id].tolist())
    revived = masked[0]
    with torch.no_grad():
        imp.tensor("block1.conv1.weight")[revived] *= 100.0
    pruner.after_step(1)
    assert revived not in pruner.masks[group.id]
    assert len(pruner.masks[group.id]) == len(masked)
    assert pruner.epoch_end(1)["revived"] >= 1


def test_a_reselect_margin_keeps_near_ties_from_swapping(tmp_path: Path) -> None:
    """Hysteresis: a masked filter returns only when it beats the weakest kept one by the margin."""
    _, model, analysis, imp = _imported(tmp_path)
    config = replace(SOFT, schedule="constant", reselect_every=1, freeze=0.5, reselect_margin=0.5)
    pruner = SoftMaskPruner(imp, model, analysis, config)
    pruner.start(steps_per_epoch=10, epochs=1)
    group = next(g for g in pruner.groups if g.layers == ("/block1/conv1/Conv",))
    masked = int(pruner.masks[group.id][0])

    def scores() -> np.ndarray:
        return score_group(group, imp.arrays(scoring_tensors([group])), "l2")

    for ratio, step, returns in ((1.2, 1, False), (2.0, 2, True)):
        score = scores()
        kept = np.setdiff1d(np.arange(group.channels), pruner.masks[group.id])
        weakest = float(score[kept].min())
        with torch.no_grad():
            imp.tensor("block1.conv1.weight")[masked] *= ratio * weakest / float(score[masked])
        assert scores()[masked] == pytest.approx(ratio * weakest, rel=1e-4)
        pruner.after_step(step)
        assert (masked not in pruner.masks[group.id]) == returns, ratio
    assert pruner.epoch_end(1)["revived"] == 1


def test_favour_kept_raises_only_the_kept_scores() -> None:
    score = np.array([1.0, 2.0, 3.0, 4.0])
    assert favour_kept(score, np.array([1]), 0.0) is score
    np.testing.assert_allclose(favour_kept(score, np.array([1, 3]), 0.1), [1.1, 2.0, 3.3, 4.0])


def test_taylor_importance_is_measured_at_the_gates(data, tmp_path: Path) -> None:
    """dL/dgate exists for kept and masked channels; the weakest by it are masked next."""
    _, model, analysis, imp = _imported(tmp_path)
    config = replace(SOFT, criterion="taylor", schedule="constant", reselect_every=3)
    pruner = SoftMaskPruner(imp, model, analysis, config)
    pruner.start(steps_per_epoch=6, epochs=1)
    assert pruner.masks == {} and pruner.rate == 0.0  # nothing measured yet: nothing masked
    images = torch.from_numpy(cifar_images(count=16, size=32))
    labels = torch.arange(16) % 10
    imp.module.train()
    for step in (1, 2):
        torch.nn.functional.cross_entropy(imp.module(images), labels).backward()
        pruner.after_step(step)
    scores = {g: (s / pruner.importance_steps).cpu().numpy() for g, s in pruner.importance.items()}
    torch.nn.functional.cross_entropy(imp.module(images), labels).backward()
    last = {g.id: pruner.gates.take_gradient(g.id).double() ** 2 for g in pruner.groups}
    for group in pruner.groups:  # the third step's squares join the first two's
        scores[group.id] = (scores[group.id] * 2 + last[group.id].numpy()) / 3
    pruner.after_step(3)  # (take_gradient above consumed nothing: the gates keep their grads)
    for group in pruner.groups:
        expected = np.argsort(scores[group.id], kind="stable")[: group.channels // 2]
        assert set(pruner.masks[group.id].tolist()) == set(expected.tolist())
    torch.nn.functional.cross_entropy(imp.module(images), labels).backward()
    group = pruner.groups[0]
    gradient = pruner.gates.take_gradient(group.id)
    assert (gradient[pruner.masks[group.id]] != 0).any(), "masked channels are measured too"


def test_freeze_phase_keeps_the_masks(tmp_path: Path) -> None:
    """After the last selection step nothing changes the masks, whatever the weights do."""
    _, model, analysis, imp = _imported(tmp_path)
    pruner = SoftMaskPruner(imp, model, analysis, replace(SOFT, reselect_every=1, freeze=0.5))
    pruner.start(steps_per_epoch=10, epochs=2)
    last = selection_steps(20, 0.5)
    assert last == 10
    for step in range(1, last + 1):
        pruner.after_step(step)
    frozen = {g: m.copy() for g, m in pruner.masks.items()}
    with torch.no_grad():
        for param in imp.module.parameters():
            param.copy_(torch.randn_like(param))
    for step in range(last + 1, 21):
        pruner.after_step(step)
    pruner.epoch_end(2)
    assert all(np.array_equal(frozen[g], pruner.masks[g]) for g in frozen)
    assert pruner.rate == SOFT.rate


def test_rate_ramps_to_the_target_at_the_end_of_the_selection_phase(tmp_path: Path) -> None:
    _, model, analysis, imp = _imported(tmp_path)
    pruner = SoftMaskPruner(imp, model, analysis, replace(SOFT, reselect_every=1, freeze=0.5))
    pruner.start(steps_per_epoch=8, epochs=1)
    kept = []
    for step in range(1, 9):
        pruner.after_step(step)
        kept.append(pruner.kept_channels)
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[3]
    assert pruner.rate == 0.5 and kept[3:] == [kept[3]] * 5


def test_a_rounded_target_is_reached_one_channel_at_a_time(tmp_path: Path) -> None:
    """With --round-to 8 the 16-wide groups narrow through the widths between 16 and 8 during
    the selection phase, and end at exactly the rounded width."""
    _, model, analysis, imp = _imported(tmp_path)
    config = replace(SOFT, reselect_every=1, freeze=0.5, round_to=8)
    pruner = SoftMaskPruner(imp, model, analysis, config)
    wide = [g for g in pruner.groups if g.channels == 16]
    assert wide
    pruner.start(steps_per_epoch=16, epochs=1)
    seen: set[int] = set()
    for step in range(1, 17):
        pruner.after_step(step)
        seen |= {len(pruner.masks.get(g.id, ())) for g in wide}
    assert seen & set(range(1, 8)), f"only the rounded widths were used: {sorted(seen)}"
    assert all(len(pruner.masks[g.id]) == 8 for g in wide)


def test_inserted_norms_keep_the_function_and_fold_back_exactly(data, tmp_path: Path) -> None:
    """A BN-folded export: norms inserted, calibrated (identity), trained, folded back."""
    _, model, _, imp = _imported(tmp_path, "fold17")
    images = torch.from_numpy(cifar_images(count=16, size=32))
    imp.module.eval()
    with torch.no_grad():
        reference = imp.module(images)
    norms = InsertedNorms(imp, model)
    assert len(norms) == 8  # every conv: the exporter folded every BatchNorm away
    loader = torch.utils.data.DataLoader(data.train, batch_size=64)
    assert norms.calibrate(loader, 3) == 3
    with torch.no_grad():
        calibrated = imp.module.eval()(images)
    assert (calibrated - reference).abs().max() <= 1e-4 * reference.abs().max()
    train(imp.module, data.train, None, CONFIG, workdir=tmp_path / "w")
    imp.module.eval()
    with torch.no_grad():
        trained = imp.module(images)
    norms.fold()
    with torch.no_grad():
        folded = imp.module(images)
    assert not any("inserted_norm" in name for name, _ in imp.module.named_modules())
    assert (folded - trained).abs().max() <= 1e-5 * trained.abs().max()


def test_distillation_term_is_zero_for_the_teacher_itself() -> None:
    logits = torch.randn(8, 10)
    assert distillation_term(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-7)
    assert distillation_term(logits, torch.randn(8, 10), 4.0).item() > 0.0
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    images, targets = torch.randn(8, 3, 2, 2), torch.arange(8)
    objective = Distillation(teacher, DistillConfig(weight=1.0))
    assert objective(teacher(images), images, targets).item() == pytest.approx(0.0, abs=1e-6)
    half = Distillation(teacher, DistillConfig(weight=0.5))
    ce = torch.nn.functional.cross_entropy(teacher(images), targets)
    assert half(teacher(images), images, targets).item() == pytest.approx(0.5 * ce.item(), 1e-5)
    assert not any(p.requires_grad for p in objective.teacher.parameters())
    objective.train()
    assert not objective.teacher.training


def test_auto_feature_weight_follows_the_run_length() -> None:
    """Whole for a few hundred steps, linear to 0 between 300 and 600, off beyond."""
    assert [auto_feature_weight(n) for n in (1, 237, 300, 450, 600, 1560)] == [
        100.0, 100.0, 100.0, 50.0, 0.0, 0.0,
    ]  # fmt: skip
    resolved, rule = resolve_features(DistillConfig(), 237)
    assert resolved.features == 100.0 and rule.startswith("auto: 100 for a 237-step run")
    resolved, rule = resolve_features(DistillConfig(), 1560)
    assert resolved.feature_weight == 0.0 and "1560-step run" in rule
    given = DistillConfig(features=3.0)
    assert resolve_features(given, 1560) == (given, "given")
    off = [
        resolve_features(DistillConfig(enabled=False), 10),
        resolve_features(DistillConfig(teacher="other.onnx"), 10),
        resolve_features(DistillConfig(), 10, unmatched="nothing is pruned"),
    ]
    assert [config.features for config, _ in off] == [0.0, 0.0, 0.0]
    assert [rule.split("(")[1] for _, rule in off] == [
        "no distillation)", "another model teaches: its channels are not the student's)",
        "nothing is pruned)",
    ]  # fmt: skip


def test_feature_match_scores_only_the_kept_channels(tmp_path: Path) -> None:
    """Zero for the teacher itself; masked channels are left out, kept ones are compared."""
    _, model, analysis, imp = _imported(tmp_path)
    teacher = import_model(model).module.eval()
    pruner = SoftMaskPruner(imp, model, analysis, replace(SOFT, schedule="constant"))
    features = FeatureMatch(imp.module, teacher, pruner.gates)
    images = torch.from_numpy(cifar_images(count=8, size=32))
    student = imp.module.eval()

    def gaps() -> dict:
        student(images)
        with torch.no_grad():
            teacher(images)
        return features.gaps()

    unmasked = gaps()  # before the first selection every gate is open
    assert len(unmasked) == len(features.keys)
    assert max(g.item() for g in unmasked.values()) <= 1e-10
    pruner.start(steps_per_epoch=4, epochs=1)  # a constant rate: half of every group masked
    assert all(len(m) for m in pruner.masks.values())
    student(images)
    first = next(iter(features.student))  # reads the stem's output: nothing masked upstream
    masked = gaps()
    assert masked[first].item() <= 1e-10, "the channels gated off are not asked to match"
    assert max(g.item() for g in masked.values()) > 1e-3, "downstream the masks are felt"
    student(images)  # without gradients nothing is recorded: evaluation costs no memory
    with torch.no_grad():
        student(images)
    assert features.student.keys() == set(features.keys)
    features.gaps()
    with torch.no_grad():
        student(images)
    assert not features.student
    features.remove()
    student(images)
    assert not features.student


def test_feature_match_adds_to_the_distillation_loss(tmp_path: Path) -> None:
    _, model, analysis, imp = _imported(tmp_path)
    teacher = import_model(model).module
    pruner = SoftMaskPruner(imp, model, analysis, replace(SOFT, schedule="constant"))
    pruner.start(steps_per_epoch=4, epochs=1)
    images, targets = torch.from_numpy(cifar_images(count=8, size=32)), torch.arange(8)
    plain = Distillation(teacher, DistillConfig())
    matched = Distillation(
        teacher, DistillConfig(features=2.0), FeatureMatch(imp.module, teacher, pruner.gates)
    )
    imp.module.eval()
    base = plain(imp.module(images), images, targets)
    total = matched(imp.module(images), images, targets)
    student = imp.module(images)
    with torch.no_grad():
        teacher(images)
    expected = base + 2.0 * matched.features.loss()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    # the epoch's record: the mean of the two (equal) scored gaps, before the weight
    gap = matched.features.epoch_end(1)["feature_gap"]
    assert gap == pytest.approx((total - base).item() / 2.0, rel=1e-5) and gap > 0
    assert matched.features.epoch_end(2) == {}, "nothing scored since: nothing reported"
    total.backward()
    assert all(p.grad is not None for p in imp.module.parameters() if p.requires_grad)
    assert student.requires_grad


def test_feature_gap_is_itself_up_to_one_and_bounded_beyond() -> None:
    """A reachable gap is scored as it is; an unreachable one pulls less the larger it is."""
    gap = torch.tensor([0.0, 0.25, 1.0, 1.5, 10.0, 1e6], dtype=torch.float64, requires_grad=True)
    scored = bounded_gap(gap)
    scored.sum().backward()
    assert torch.equal(scored[:3], gap[:3])
    assert torch.equal(gap.grad[:3], torch.ones(3, dtype=torch.float64))
    assert scored.detach().tolist()[3:] == pytest.approx([2 - 1 / 1.5, 1.9, 2 - 1e-6])
    assert gap.grad.tolist()[3:] == pytest.approx([1 / 1.5**2, 1e-2, 1e-12])
    left, right = (bounded_gap(torch.tensor(1.0 + d, dtype=torch.float64)) for d in (-1e-7, 1e-7))
    assert (right - left).item() == pytest.approx(2e-7, rel=1e-6), "value and slope continuous"


def test_soft_mask_config_rejects_bad_values() -> None:
    from sfp_onnx.errors import UsageError

    for bad in (
        {"method": "magic"}, {"freeze": 1.0}, {"reselect_every": 0}, {"masked_scale": "half"},
        {"independent_layers": True}, {"reselect_margin": -0.1},
    ):  # fmt: skip
        with pytest.raises(UsageError):
            SfpConfig(rate=0.3, **bad)
    with pytest.raises(UsageError, match="--distill-features"):
        DistillConfig(features=-1.0)
    for decay in (0.0, 1.5):
        with pytest.raises(UsageError, match="--distill-features-decay"):
            DistillConfig(features=1.0, features_decay=decay)
    with pytest.raises(UsageError, match="with --teacher give --distill-features 0"):
        DistillConfig(features=1.0, teacher="original.onnx")
