"""`plan` and `prune --plan`: per-group widths for a MACs budget, on real exports.

Graph cases: the CIFAR ResNet-20 that sfp-onnx ships (residual groups that span many
layers), a ResNeXt-style net with grouped convs (tests/exports.py GroupedNet) and
torchvision's ResNet-18. What is checked is what a user relies on: the prediction is the
MACs of the file written, the target is met, every width honours rounding, convolution
groups and the floor, a plan goes through JSON into `prune --plan` unchanged, and a plan
is refused for a model it was not made for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sfp_onnx.cli.main import main

import sfp_onnx
from sfp_onnx.graph.measure import measure_model
from sfp_onnx.planning import read_plan
from tests.exports import GroupedNet, export, randomize_norms, torchvision_model

RESNET20 = Path(__file__).resolve().parents[1] / "examples" / "resnet20_cifar10.onnx"


@pytest.mark.parametrize("round_to", [None, 8])
@pytest.mark.parametrize("target", [0.7, 0.5, 0.3])
def test_the_prediction_is_the_written_files_macs(tmp_path, target, round_to):
    plan = sfp_onnx.make_plan(RESNET20, target_macs=target, round_to=round_to)
    out = tmp_path / "slim.onnx"
    report = sfp_onnx.prune(RESNET20, out, plan=plan)
    assert report.verification.exact
    measured = measure_model(out).macs
    assert measured == pytest.approx(plan.predicted_macs, rel=1e-6)
    assert plan.reached and measured <= target * plan.full_macs
    assert measured >= (target - 0.05) * plan.full_macs  # the greedy stops at the target
    for group in plan.groups:
        assert group.kept == group.channels or group.kept % (round_to or 1) == 0
        assert group.kept >= 0.3 * group.channels  # --max-rate 0.7


def test_grouped_convs_keep_whole_steps_per_group(tmp_path):
    torch.manual_seed(0)
    path = export(randomize_norms(GroupedNet(width=16)), tmp_path / "grouped.onnx", size=16)
    plan = sfp_onnx.make_plan(path, target_macs=0.6, round_to=None)
    steps = {g.id: g.step for g in plan.groups}
    # the stream and the widened 24 are read or made in 2 parts, the grouped conv's in 4
    assert sorted(steps.values()) == [2, 2, 4, 4]
    report = sfp_onnx.prune(path, tmp_path / "slim.onnx", plan=plan)
    assert report.verification.exact
    for group in plan.groups:
        assert group.kept % group.step == 0
    assert report.after.macs <= 0.6 * report.before.macs


def test_floors_bound_the_cut_and_say_the_target_is_out_of_reach():
    plan = sfp_onnx.make_plan(RESNET20, target_macs=0.05, round_to=None, max_rate=0.5)
    assert not plan.reached
    assert all(g.kept >= 0.5 * g.channels for g in plan.groups)
    assert plan.predicted_macs > 0.05 * plan.full_macs


def test_a_plan_goes_through_json_into_prune_unchanged(tmp_path):
    runner = CliRunner()
    plan_file, out = tmp_path / "plan.json", tmp_path / "slim.onnx"
    result = runner.invoke(main, ["plan", str(RESNET20), "--target-macs", "0.5",
                                  "--round-to", "8", "-o", str(plan_file)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "predicted" in result.stdout and "prune" in result.stdout
    data = json.loads(plan_file.read_text())
    assert data["format"] == "sfp-onnx plan 1" and data["target"] == {"macs": 0.5}
    args = ["prune", str(RESNET20), "--plan", str(plan_file), "-o", str(out),
            "--report", str(tmp_path / "r.json")]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    kept = {g["id"]: g["kept"] for g in report["groups"]}
    planned = {g.id: g.kept for g in read_plan(plan_file).groups}
    assert planned == {gid: kept[gid] for gid in planned}
    assert any(k < c for k, c in ((g.kept, g.channels) for g in read_plan(plan_file).groups))
    assert report["macs"]["after"] == pytest.approx(data["predicted_macs"], rel=1e-6)


def _error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


def test_a_plan_for_another_model_is_refused_in_one_line(tmp_path):
    plan_file = tmp_path / "plan.json"
    sfp_onnx.make_plan(RESNET20, target_macs=0.5, output=plan_file)
    other = export(torchvision_model("resnet18"), tmp_path / "r18.onnx", size=32)
    line = _error(["prune", str(other), "--plan", str(plan_file), "-o", str(tmp_path / "o.onnx")])
    assert "does not fit this model" in line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--rate", "0.3", "--plan", "PLAN"], "exactly one of --rate and --plan"),
        ([], "exactly one of --rate and --plan"),
        (["--plan", "missing.json"], "not found"),
        (["--plan", "BAD"], "not an sfp-onnx plan"),
    ],
)
def test_plan_options_give_one_line_errors(tmp_path, args, expected):
    plan_file, bad = tmp_path / "plan.json", tmp_path / "bad.json"
    sfp_onnx.make_plan(RESNET20, target_macs=0.5, output=plan_file)
    bad.write_text(json.dumps({"format": "something else"}))
    args = [str(plan_file) if a == "PLAN" else str(bad) if a == "BAD" else a for a in args]
    line = _error(["prune", str(RESNET20), *args, "-o", str(tmp_path / "o.onnx")])
    assert expected in line


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d.update(target={"macs": None}), "target"),
        (lambda d: d["groups"][0].update(kept="16"), "not an integer"),
        (lambda d: d.pop("predicted_macs"), "incomplete or malformed"),
    ],
)
def test_a_hand_edited_plan_is_refused_in_one_line(tmp_path, edit, expected):
    plan_file = tmp_path / "plan.json"
    sfp_onnx.make_plan(RESNET20, target_macs=0.5, output=plan_file)
    data = json.loads(plan_file.read_text())
    edit(data)
    plan_file.write_text(json.dumps(data))
    line = _error(["compress", str(RESNET20), "--plan", str(plan_file), "--data", "cifar10",
                   "-o", str(tmp_path / "o.onnx")])  # fmt: skip
    assert "malformed" in line and expected in line
    assert not (tmp_path / "o.onnx").exists()


def test_plan_target_out_of_range_is_one_line():
    assert "(0, 1]" in _error(["plan", str(RESNET20), "--target-macs", "1.5"])


@pytest.mark.parametrize(
    "args",
    [[], ["--target-macs", "0.5", "--target-speedup", "2"],
     ["--target-speedup", "2", "--target-latency-ms", "5"]],
)  # fmt: skip
def test_plan_targets_are_mutually_exclusive(args):
    line = _error(["plan", str(RESNET20), *args])
    assert "exactly one of --target-macs, --target-speedup and --target-latency-ms" in line


def test_a_speed_target_is_timed_then_cached_and_the_plan_applies(tmp_path):
    """``--target-speedup``: plans timed in onnxruntime against the original; the rerun reads
    every timing from the cache (no new measurement) and gives the same widths; the plan,
    with its measurement, goes into ``prune --plan``."""
    cache, first, second = tmp_path / "cache", tmp_path / "a.json", tmp_path / "b.json"
    args = ["plan", str(RESNET20), "--target-speedup", "1.4", "--bench-batch", "8",
            "--timing-seconds", "2", "--cache-dir", str(cache)]  # fmt: skip
    timed = CliRunner().invoke(main, [*args, "-o", str(first)], catch_exceptions=False)
    assert timed.exit_code == 0, timed.output
    assert "timing the plan for" in timed.output and "measured:" in timed.output
    plan = read_plan(first)
    if plan.measured["within_5_percent"]:  # an answer is timed again before it is given
        assert "confirming the plan" in timed.output and plan.measured["confirmed"]
    assert plan.target == {"speedup": 1.4} and plan.measured["batch"] == 8
    assert plan.measured["speedup"] > 1.0 and plan.predicted_macs < plan.full_macs
    cached = json.loads(next(cache.glob("speed-*.json")).read_text())
    assert len(cached["points"]) >= 1 and cached["key"]["batch"] == 8
    rerun = CliRunner().invoke(main, [*args, "-o", str(second)], catch_exceptions=False)
    assert rerun.exit_code == 0 and "cached in" in rerun.output, rerun.output
    if plan.measured["within_5_percent"]:  # the answer given is taken again, nothing re-timed
        assert "timing the plan" not in rerun.output, rerun.output
        assert [g.kept for g in read_plan(second).groups] == [g.kept for g in plan.groups]
    else:  # a miss (timing noise on a loaded machine): the rerun searches on from the cache
        again = json.loads(next(cache.glob("speed-*.json")).read_text())
        targets = {point["macs_target"] for point in again["points"]}
        assert {point["macs_target"] for point in cached["points"]} <= targets
    out = tmp_path / "slim.onnx"
    pruned = CliRunner().invoke(
        main, ["prune", str(RESNET20), "--plan", str(first), "-o", str(out)]
    )
    assert pruned.exit_code == 0, pruned.output
    assert measure_model(out).macs == round(plan.predicted_macs)


def test_an_unreachable_speed_target_is_said_and_strict_makes_it_an_error(tmp_path):
    """50x is beyond every group's floor: the plan says it misses; --strict refuses."""
    args = ["plan", str(RESNET20), "--target-speedup", "50", "--timing-seconds", "2",
            "--cache-dir", str(tmp_path)]  # fmt: skip
    said = CliRunner().invoke(main, args, catch_exceptions=False)
    assert said.exit_code == 0 and "misses the target by more than 5%" in said.output
    line = _error([*args, "--strict", "-o", str(tmp_path / "plan.json")])
    assert "more than 5% from the target (--strict)" in line
    assert not (tmp_path / "plan.json").exists()


def test_the_speed_search_steps_past_a_point_it_has_timed():
    """Where speed is not monotone in the MACs the fit can propose a fraction it has timed:
    with every point on one side of the goal the search steps past the outermost one (to
    the MACs floor at most); once the goal is bracketed, or the floor is timed, it stops."""
    from sfp_onnx.speed_targets import SpeedPoint, _untried

    def point(fraction: float, speedup: float) -> SpeedPoint:
        return SpeedPoint(fraction, fraction, speedup, 1.0 / speedup, 1.0)

    slow = [point(0.667, 1.25), point(0.465, 1.10)]  # the narrower file ran slower
    assert _untried(slow, 0.3, 1.5, 0.3) == 0.3  # not timed yet: as proposed
    assert _untried(slow, 0.465, 1.5, 0.3) == pytest.approx(0.465 * 0.8)
    fast = [point(0.5, 2.5), point(0.4, 2.7)]
    assert _untried(fast, 0.5, 1.5, 0.3) == pytest.approx(0.625)
    assert _untried([point(0.667, 1.2), point(0.3, 1.8)], 0.3, 1.5, 0.3) is None
    at_floor = [point(0.11, 1.3), point(0.09, 1.4)]
    assert _untried(at_floor, 0.11, 1.5, 0.3) is None  # 0.11 * 0.8 < 0.09: the floor, timed
