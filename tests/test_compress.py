"""`compress` end to end: a CIFAR ResNet ONNX fine-tuned with SFP on real CIFAR-10 images.

Graph case: ResNet-8 from sfp_onnx.training.zoo (projection shortcuts, BN kept), exported inside the
test; real CIFAR-10 subsets from ../shared/data/cifar10. Also: stopping in the middle and
resuming gives the same model as an uninterrupted run.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from sfp_onnx.cli.main import main

import sfp_onnx
from sfp_onnx.data.datasets import DataConfig
from sfp_onnx.errors import TrainingInterrupted
from sfp_onnx.graph.measure import measure_model
from sfp_onnx.pipeline import CompressOptions
from sfp_onnx.runtime.session import create_session
from sfp_onnx.training.objectives import DistillConfig
from sfp_onnx.training.sfp import SfpConfig
from sfp_onnx.training.train import TrainConfig
from sfp_onnx.training.zoo import create_cifar_resnet, export_onnx
from tests.exports import cifar10_root


def _data(**overrides) -> DataConfig:
    if not cifar10_root().exists():
        pytest.skip("real CIFAR-10 not found (set SFP_ONNX_CIFAR10)")
    settings = {"train_limit": 400, "eval_limit": 200, "seed": 0, **overrides}
    return DataConfig("cifar10", root=str(cifar10_root()), **settings)


def _weights(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_compress_cli_end_to_end(resnet8, tmp_path):
    out, masked, report = tmp_path / "slim.onnx", tmp_path / "masked.onnx", tmp_path / "r.json"
    before = resnet8.read_bytes()
    args = [
        "compress", str(resnet8), "--rate", "0.3", "--data", "cifar10",
        "--data-root", str(cifar10_root()), "--epochs", "2", "--train-limit", "400",
        "--eval-limit", "200", "--workers", "0", "--lr", "0.05", "-o", str(out),
        "--round-to", "none",
        "--save-masked", str(masked), "--report", str(report), "--workdir", str(tmp_path / "w"),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "top-1 accuracy" in result.output and "exact" in result.output
    assert "distillation: from the input model" in result.output
    # the feature weight's default follows the run's length: 2 epochs x 3 steps is short
    assert "+ 100 × the kept channels' gap" in result.output
    assert "feature weight auto: 100 for a 6-step run" in result.output
    assert result.output.count("kept-channel gap ") == 2  # on each epoch's line
    assert "(a masked channel returns only 10% above a kept one)" in result.output
    assert f"checkpoints kept in {tmp_path / 'w'}" in result.output  # a named workdir stays
    assert (tmp_path / "w").is_dir()
    assert resnet8.read_bytes() == before
    onnx.checker.check_model(str(out), full_check=True)
    src, dst = onnx.load(str(resnet8)).graph, onnx.load(str(out)).graph
    assert [(v.name, v.type) for v in src.input] == [(v.name, v.type) for v in dst.input]
    assert [(v.name, v.type) for v in src.output] == [(v.name, v.type) for v in dst.output]
    data = json.loads(report.read_text())
    assert 1 - data["macs"]["after"] / data["macs"]["before"] >= 0.40
    assert data["macs"]["after"] == measure_model(out).macs
    assert data["verification"]["exact"] and data["verification"]["inputs"].startswith("real")
    assert len(data["training"]["epochs"]) == 2
    assert data["settings"]["distillation"]["features"] == 100.0
    assert data["settings"]["distillation"]["features_rule"].startswith("auto: 100")
    assert data["settings"]["pruning"]["reselect_margin"] == 0.1
    # exact against --save-masked on real images
    from tests.exports import cifar_images

    images = cifar_images(count=32, size=32)
    y_masked = create_session(masked, provider="cpu").run(None, {"input": images})[0]
    y_slim = create_session(out, provider="cpu").run(None, {"input": images})[0]
    assert np.abs(y_masked - y_slim).max() <= 1e-4 * np.abs(y_masked).max()
    # the reported accuracy is what `eval` measures on the same images
    evaluated = CliRunner().invoke(
        main,
        ["eval", str(out), "--data", "cifar10", "--data-root", str(cifar10_root()),
         "--limit", "200", "--workers", "0", "--json", str(tmp_path / "eval.json")],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "eval.json").read_text())["top1"] == data["accuracy"]["after"]


def test_default_workdir_goes_once_the_output_is_written(resnet8, tmp_path):
    """Running the same command twice works: the default OUTPUT.work is not left behind."""
    out = tmp_path / "slim.onnx"
    training = TrainConfig(epochs=1, workers=0)
    data = _data(train_limit=128, eval_limit=64)
    for _ in range(2):
        report = sfp_onnx.compress(
            resnet8, out, sfp=SfpConfig(rate=0.3), data=data, training=training,
            options=CompressOptions(bench=False),
        )  # fmt: skip
        assert report.extra["training"]["workdir"] is None
        assert out.exists() and not (tmp_path / "slim.onnx.work").exists()


@pytest.mark.parametrize(
    "distill",
    [
        DistillConfig(),
        DistillConfig(features=0.0),
        DistillConfig(features=100.0, features_decay=0.6),
    ],
    ids=["default-auto-feature-match", "no-feature-match", "decaying-feature-match"],
)
def test_resumed_run_equals_uninterrupted_run(resnet8, tmp_path, distill):
    """Every piece's state comes back, the feature weight's place on its decay included."""
    sfp = SfpConfig(rate=0.3)
    training = TrainConfig(epochs=3, lr=0.05, workers=0, seed=1)
    full = tmp_path / "full.onnx"
    sfp_onnx.compress(
        resnet8, full, sfp=sfp, data=_data(), training=training, distill=distill,
        options=CompressOptions(workdir=tmp_path / "w1", bench=False),
    )  # fmt: skip

    def stop_in_epoch_two(event) -> None:
        if getattr(event, "kind", "") == "batch" and event.epoch == 2:
            raise KeyboardInterrupt

    stopped = tmp_path / "resumed.onnx"
    with pytest.raises(TrainingInterrupted, match="--resume"):
        sfp_onnx.compress(
            resnet8, stopped, sfp=sfp, data=_data(), training=training, distill=distill,
            options=CompressOptions(
                workdir=tmp_path / "w2", bench=False, progress=stop_in_epoch_two
            ),
        )  # fmt: skip
    assert not stopped.exists(), "an interrupted run writes no model"
    report = sfp_onnx.compress(
        resnet8, stopped, sfp=sfp, data=_data(), training=training, distill=distill,
        options=CompressOptions(workdir=tmp_path / "w2", bench=False, resume=True),
    )  # fmt: skip
    assert report.extra["training"]["resumed_from"] == 1
    a, b = _weights(full), _weights(stopped)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), "same masks and weights"


def test_class_count_mismatch_is_one_line(tmp_path):
    if not cifar10_root().exists():
        pytest.skip("real CIFAR-10 not found (set SFP_ONNX_CIFAR10)")
    torch.manual_seed(0)
    path = tmp_path / "r8_100.onnx"
    export_onnx(create_cifar_resnet(8, num_classes=100), path)
    args = ["compress", str(path), "--rate", "0.3", "--data", "cifar10",
            "--data-root", str(cifar10_root()), "-o", str(tmp_path / "o.onnx")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "100" in result.stderr and "10 classes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.onnx").exists()


def _cli_error(args: list[str]) -> str:
    """The one ``error:`` line on stderr (stdout may show the stages that ran before it)."""
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "error" not in result.stdout
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--data-root", "/nonexistent/cifar"], "does not exist"),
        (["--mean", "0.5", "0.5"], "'--mean' requires 3 arguments"),
        (["--std", "0.2", "0", "0.2"], "std"),
        (["--rate", "1.5"], "rate must be in [0, 1)"),
        (["--target-macs", "0.5"], "give exactly one of --rate, --plan, --target-macs"),
        (["--plan", "/nonexistent/plan.json"], "give exactly one of --rate, --plan, --target-macs"),
        (["--sensitivity"], "--sensitivity weighs the widths of a target"),
        (["--teacher", "t.onnx", "--distill-features", "1"], "with --teacher give"),
    ],
)
def test_bad_compress_inputs_give_one_line(resnet8, tmp_path, extra, expected):
    out = tmp_path / "o.onnx"
    args = ["compress", str(resnet8), "--rate", "0.3", "--data", "cifar10",
            "--data-root", str(cifar10_root()), "-o", str(out), *extra]  # fmt: skip
    before = resnet8.read_bytes()
    assert expected in _cli_error(args)
    assert not out.exists() and resnet8.read_bytes() == before


def test_empty_data_folder_is_refused(resnet8, tmp_path):
    (tmp_path / "empty").mkdir()
    args = ["compress", str(resnet8), "--rate", "0.3", "--data", "imagefolder",
            "--data-root", str(tmp_path / "empty"), "-o", str(tmp_path / "o.onnx")]  # fmt: skip
    assert "empty" in _cli_error(args)


def test_unsupported_op_stops_compress_before_training(tmp_path):
    """A Conv classifier with an op onnx2torch cannot convert (Shrink): one line naming it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1] * 4),
        helper.make_node("Shrink", ["c"], ["s"], lambd=0.1),
        helper.make_node("GlobalAveragePool", ["s"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "shrink",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [w, fc],
    )  # fmt: skip
    path = tmp_path / "shrink.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path.write_bytes(model.SerializeToString())
    args = ["compress", str(path), "--rate", "0.3", "--data", "cifar10", "--eval-limit", "20",
            "--data-root", str(cifar10_root()), "-o", str(tmp_path / "o.onnx"),
            "--workers", "0"]  # fmt: skip
    line = _cli_error(args)
    assert "Shrink-9" in line and "prune still work" in line
    assert not (tmp_path / "o.onnx").exists()


def test_round_to_auto_is_resolved_and_recorded(resnet8, tmp_path):
    report = sfp_onnx.compress(
        resnet8, tmp_path / "slim.onnx", sfp=SfpConfig(rate=0.3, round_to="auto"),
        data=_data(train_limit=100, eval_limit=50), training=TrainConfig(epochs=1, workers=0),
        options=CompressOptions(workdir=tmp_path / "w", bench=False),
    )  # fmt: skip
    from sfp_onnx.runtime.target import resolve_round_to

    multiple = resolve_round_to("auto", "cpu")
    assert report.settings["pruning"]["round_to"] == multiple
    assert all(g.kept % multiple == 0 for g in report.groups if g.kept < g.channels)


def test_compress_a_resnext_style_net_keeps_every_conv_group_equal(tmp_path):
    """Grouped 3x3 convs (groups 4 and 2) in a residual bottleneck: soft masks pick the same
    count in every convolution group, the written file keeps ``group`` and is exact."""
    from tests.exports import GroupedNet, export, randomize_norms

    torch.manual_seed(0)
    source = export(randomize_norms(GroupedNet(width=16)), tmp_path / "grouped.onnx", size=32)
    report = _compress_small(source, tmp_path)
    assert report.verification.exact
    assert sorted(g.kept for g in report.groups if g.prunable) == [12, 12, 12, 18]
    slim = onnx.load(str(tmp_path / "slim.onnx"))
    groups = sorted(a.i for n in slim.graph.node for a in n.attribute if a.name == "group")
    assert groups[-2:] == [2, 4]


@pytest.mark.parametrize("method", ["soft-mask", "sfp-paper"])
def test_a_bn_folded_export_trains_with_norms_and_is_still_cut(tmp_path, method):
    """A folded export trains with a BatchNorm back after each conv, folded away before the
    file is written; the channels the method zeroed are still zero after that fold (the
    folded-back shift would otherwise revive them: the paper mode once wrote a 0% cut)."""
    torch.manual_seed(0)
    source = tmp_path / "folded.onnx"
    export_onnx(create_cifar_resnet(depth=8), source, fold_bn=True)
    assert not [n for n in onnx.load(str(source)).graph.node if n.op_type == "BatchNormalization"]
    report = sfp_onnx.compress(
        source, tmp_path / "slim.onnx", sfp=SfpConfig(rate=0.3, round_to=None, method=method),
        data=_data(train_limit=128, eval_limit=64), training=TrainConfig(epochs=2, workers=0),
        options=CompressOptions(workdir=tmp_path / "w", bench=False),
    )  # fmt: skip
    assert report.verification.exact
    assert report.macs_reduction > 0.3
    assert [g.kept for g in report.groups if g.prunable] == [
        g.channels - int(0.3 * g.channels) for g in report.groups if g.prunable
    ]


def test_compress_a_group_norm_net_removes_whole_norm_groups(tmp_path):
    """GroupNorm of 4 groups of 4 channels (legacy export: InstanceNormalization between two
    Reshapes): soft masks take whole groups, and the written file is exact."""
    from tests.exports import GroupNormNet, export

    torch.manual_seed(0)
    source = export(GroupNormNet(width=16), tmp_path / "gn.onnx", size=32)
    report = _compress_small(source, tmp_path)
    assert report.verification.exact
    assert sorted(g.kept for g in report.groups if g.prunable) == [3, 3]  # groups of 4
    assert report.after.macs < 0.7 * report.before.macs


@pytest.mark.parametrize("kind", ["glu", "branches"])
def test_compress_through_channel_splits(tmp_path, kind):
    """A GLU gate (the halves of one conv joined channel by channel) and a split into two
    branches: soft masks at the pieces' consumers train, and the file written is exact."""
    from tests.exports import ChannelSplitNet, export, randomize_norms

    torch.manual_seed(0)
    source = export(randomize_norms(ChannelSplitNet(kind)), tmp_path / "split.onnx", size=32)
    report = _compress_small(source, tmp_path)
    assert report.verification.exact
    assert report.after.macs < 0.7 * report.before.macs


def test_compress_to_a_macs_target_trains_to_the_plans_widths(resnet8, tmp_path):
    """``--target-macs``: a plan of per-group widths, each group ramped to its own width; the
    written file costs exactly the MACs the plan predicts, and the report holds the plan."""
    out, report = tmp_path / "slim.onnx", tmp_path / "r.json"
    args = [
        "compress", str(resnet8), "--target-macs", "0.6", "--round-to", "none",
        "--data", "cifar10", "--data-root", str(cifar10_root()), "--epochs", "2",
        "--train-limit", "256", "--eval-limit", "64", "--workers", "0", "--no-bench",
        "-o", str(out), "--report", str(report), "--workdir", str(tmp_path / "w"),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "to a plan (macs 0.6; widths weigh measured sensitivity)" in result.output
    data = json.loads(report.read_text())
    plan = data["settings"]["pruning"]["plan"]
    assert plan["target"] == {"macs": 0.6} and plan["reached"]
    assert plan["importance"] == "sensitivity" and plan["sensitivity"]["rises"]  # the default
    assert data["macs"]["after"] == measure_model(out).macs == round(plan["predicted_macs"])
    assert data["macs"]["after"] <= 0.6 * data["macs"]["before"]
    rates = {round(1 - g["kept"] / g["channels"], 3) for g in plan["groups"]}
    assert len(rates) > 1  # per-group widths, not one rate
    kept = [e["extra"]["kept_channels"] for e in data["training"]["epochs"]]
    assert kept == sorted(kept, reverse=True)  # ramped down...
    assert kept[-1] == sum(g["kept"] for g in plan["groups"])  # ...to exactly the plan


def test_compress_to_a_speed_target_reports_planned_and_measured_speed(
    resnet8, tmp_path, monkeypatch
):
    """``--target-speedup``: the plan is timed at --bench-batch (cached under
    $XDG_CACHE_HOME), trained to, and the summary sets the speed seen when planning beside
    the speed of the file written."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out, report = tmp_path / "slim.onnx", tmp_path / "r.json"
    args = [
        "compress", str(resnet8), "--target-speedup", "1.3", "--bench-batch", "8",
        "--timing-seconds", "2", "--no-sensitivity", "--data", "cifar10",
        "--data-root", str(cifar10_root()),
        "--epochs", "1",
        "--train-limit", "128", "--eval-limit", "64", "--workers", "0",
        "-o", str(out), "--report", str(report), "--workdir", str(tmp_path / "w"),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "timing the plan for" in result.output and "speed target 1.3x:" in result.output
    assert "widths weigh l2 scores" in result.output  # --no-sensitivity
    plan = json.loads(report.read_text())["settings"]["pruning"]["plan"]
    assert plan["target"] == {"speedup": 1.3} and plan["measured"]["batch"] == 8
    assert list((tmp_path / "cache" / "sfp-onnx").glob("speed-*.json"))
    assert measure_model(out).macs == round(plan["predicted_macs"])


def test_strict_stops_compress_before_training_on_a_missed_speed_target(
    resnet8, tmp_path, monkeypatch
):
    """50x is beyond every group's floor: with --strict, one error line once the plan is
    timed, before any training, and nothing written."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "slim.onnx"
    args = ["compress", str(resnet8), "--target-speedup", "50", "--timing-seconds", "2",
            "--no-sensitivity", "--strict", "--data", "cifar10",
            "--data-root", str(cifar10_root()), "--workdir", str(tmp_path / "w"),
            "-o", str(out)]  # fmt: skip
    assert "more than 5% from the target (--strict)" in _cli_error(args)
    assert not out.exists() and not (tmp_path / "w").exists()


def test_a_plan_needs_the_soft_mask_method(resnet8, tmp_path):
    args = ["compress", str(resnet8), "--target-macs", "0.6", "--method", "sfp-paper",
            "--data", "cifar10", "--data-root", str(cifar10_root()),
            "-o", str(tmp_path / "o")]  # fmt: skip
    assert "a plan's per-group widths need --method soft-mask" in _cli_error(args)


def _compress_small(source, tmp_path):
    """One epoch on 128 real images at rate 0.3, no rounding: the pattern tests' budget."""
    return sfp_onnx.compress(
        source, tmp_path / "slim.onnx", sfp=SfpConfig(rate=0.3, round_to=None),
        data=_data(train_limit=128, eval_limit=64), training=TrainConfig(epochs=1, workers=0),
        options=CompressOptions(workdir=tmp_path / "w", bench=False),
    )  # fmt: skip
