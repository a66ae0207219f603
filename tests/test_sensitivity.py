"""`--sensitivity`: the measured loss rise per group and width, and the widths it leads to.

Measured on the CIFAR ResNet-20 that sfp-onnx ships, on real CIFAR-10 images: what a cut of
one group costs is positive where the network needs the group, repeatable to the bit, and
leaves the model untouched. The allocator given such a table narrows what is cheap to lose
first, never narrows a group it has no measurement for, and the plan records what it weighed;
`plan --sensitivity` goes through JSON into `prune --plan`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from click.testing import CliRunner
from sfp_onnx.cli.main import main

import sfp_onnx
from sfp_onnx.data.datasets import DataConfig
from sfp_onnx.graph.allocate import candidate_widths
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.load import load_model
from sfp_onnx.graph.measure import measure_model
from sfp_onnx.planning import read_plan
from sfp_onnx.training.sensitivity import Sensitivity, SensitivityConfig

RESNET20 = Path(__file__).resolve().parents[1] / "examples" / "resnet20_cifar10.onnx"
SMALL = SensitivityConfig(calibration_images=64, norm_batches=1, batch_size=32, widths_per_group=1)


def _groups() -> dict[int, int]:
    analysis = analyze_model(load_model(RESNET20))
    return {g.id: g.channels for g in analysis.prunable_groups if g.filters}


def _table(rises: dict[int, float], groups: dict[int, int]) -> Sensitivity:
    """Loss rise ``rises[g]`` per channel removed from group g, at every width a plan may give."""
    table = {
        gid: {w: rises[gid] * (channels - w) for w in range(1, channels)}
        for gid, channels in groups.items() if gid in rises
    }  # fmt: skip
    return Sensitivity(base_loss=0.5, rises=table, calibration_images=0, norm_batches=0,
                       criterion="l2")  # fmt: skip


def test_the_free_group_goes_first_and_an_unmeasured_one_is_never_cut():
    groups = _groups()
    free, unmeasured = min(groups), max(groups)
    rises = {gid: 1.0 for gid in groups if gid != unmeasured}
    rises[free] = 0.0
    plan = sfp_onnx.make_plan(
        RESNET20, target_macs=0.9, round_to=None, sensitivity=_table(rises, groups)
    )
    kept = {g.id: g.kept for g in plan.groups}
    assert kept[free] < groups[free]  # 10% of the MACs come from the free group alone
    assert all(kept[gid] == channels for gid, channels in groups.items() if gid != free)
    deeper = sfp_onnx.make_plan(
        RESNET20, target_macs=0.4, round_to=None, sensitivity=_table(rises, groups)
    )
    kept = {g.id: g.kept for g in deeper.groups}
    assert kept[free] == -(-3 * groups[free] // 10)  # at its floor (--max-rate 0.7)
    assert kept[unmeasured] == groups[unmeasured]
    assert plan.reached and plan.predicted_macs <= 0.9 * plan.full_macs
    assert plan.importance == "sensitivity" and plan.sensitivity["base_loss"] == 0.5


def test_a_costly_group_keeps_more_than_the_filter_scores_give_it():
    """The same target, weighed two ways: the group made costly keeps more with the table."""
    groups = _groups()
    by_filters = sfp_onnx.make_plan(RESNET20, target_macs=0.5, round_to=8)
    cut = {g.id: g.channels - g.kept for g in by_filters.groups}
    costly = max(cut, key=cut.get)  # the group the filter scores cut most
    rises = {gid: 0.01 for gid in groups}
    rises[costly] = 10.0
    weighed = sfp_onnx.make_plan(
        RESNET20, target_macs=0.5, round_to=8, sensitivity=_table(rises, groups)
    )
    assert {g.id: g.kept for g in weighed.groups}[costly] == groups[costly]
    assert weighed.reached and weighed.predicted_macs <= 0.5 * weighed.full_macs
    for group in weighed.groups:  # rounding and floors as for any plan
        assert group.kept == group.channels or group.kept % 8 == 0
        assert group.kept >= 0.3 * group.channels


def test_sensitivity_is_measured_on_real_images_repeatably_and_changes_nothing(cifar10_root):
    data = DataConfig("cifar10", root=str(cifar10_root), train_limit=2000, seed=0)
    before = hashlib.sha256(RESNET20.read_bytes()).hexdigest()
    first = sfp_onnx.measure_plan_sensitivity(RESNET20, data, round_to=8, config=SMALL)
    again = sfp_onnx.measure_plan_sensitivity(RESNET20, data, round_to=8, config=SMALL)
    assert hashlib.sha256(RESNET20.read_bytes()).hexdigest() == before
    assert first.rises == again.rises  # the same images for every cut, on the CPU: bit-equal
    analysis = analyze_model(load_model(RESNET20))
    for group in analysis.prunable_groups:
        widths = candidate_widths(group, 8, 0.7, 1)
        assert sorted(first.rises[group.id]) == sorted(widths)
    # the residual streams are what the whole network reads: cutting one to its floor hurts
    streams = [g for g in analysis.prunable_groups if len(g.layers) > 2]
    assert streams and all(first.rises[g.id][min(first.rises[g.id])] > 0.01 for g in streams)
    assert first.calibration_images == 64 and first.norm_batches == 1
    assert json.loads(json.dumps(first.to_json())) == first.to_json()
    assert Sensitivity.from_json(first.to_json()).rises == first.rises


def test_plan_sensitivity_goes_through_json_into_prune(resnet8, cifar10_root, tmp_path):
    plan_file, out = tmp_path / "plan.json", tmp_path / "slim.onnx"
    result = CliRunner().invoke(
        main,
        ["plan", str(resnet8), "--target-macs", "0.6", "--sensitivity", "--data", "cifar10",
         "--data-root", str(cifar10_root), "--train-limit", "1000", "--calibration-images",
         "64", "--round-to", "8", "-o", str(plan_file)],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "sensitivity:" in result.output and "held-back images" in result.output
    plan = read_plan(plan_file)
    assert plan.importance == "sensitivity" and plan.sensitivity["calibration_images"] == 64
    assert set(map(int, plan.sensitivity["rises"])) == {g.id for g in plan.groups}
    pruned = CliRunner().invoke(main, ["prune", str(resnet8), "--plan", str(plan_file),
                                       "-o", str(out)])  # fmt: skip
    assert pruned.exit_code == 0, pruned.output
    assert measure_model(out).macs == round(plan.predicted_macs)
