"""Soft pruning on the real CIFAR-10: every way to reach a cut, at the same training budget.

Starting from the shipped ResNet-20 (examples/resnet20_cifar10.onnx, or --model), every arm
gets the same fine-tuning budget (epochs x training images) on the same data:

- ``unpruned``: fine-tuned at rate 0 (what the budget buys without pruning);
- ``hard``: one-shot ``prune`` at the rate (L2), then the slim model fine-tuned;
- ``hard+kd``: the same, distilling from the unpruned input;
- ``paper``: the paper's SFP (``--method sfp-paper --schedule constant --no-distill``);
- ``soft``: ``compress``'s default (masks in the forward pass, ramp, freeze, distillation
  of the logits, and of the kept channels by the run's length: ``--distill-features auto``);
- ``soft-nokd``: the default without distillation;
- variants of the default for the design choices (``--arms`` lists them, see ARMS).

Accuracy is measured in onnxruntime on the written files (the full 10,000-image test set
unless --eval-limit), MACs and parameters on the files, latency interleaved in onnxruntime.
Writes results/<name>.md, .json and a plot of accuracy against MACs cut.

    python benchmarks/sfp_cifar10.py                          # budget (b): 4 epochs x 50,000
    python benchmarks/sfp_cifar10.py --budget quickstart      # the README's quick start
    python benchmarks/sfp_cifar10.py --arms soft soft-decay --rates 0.3 --name design
    python benchmarks/sfp_cifar10.py --quick                  # smoke run, temp folder
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._models import fold_zoo_export  # noqa: E402
from benchmarks._results import Run, default_out, md_table, write_results  # noqa: E402
from sfp_onnx import api  # noqa: E402
from sfp_onnx.data.datasets import DataConfig, load_datasets  # noqa: E402
from sfp_onnx.errors import TrainingDiverged  # noqa: E402
from sfp_onnx.graph.measure import measure_model  # noqa: E402
from sfp_onnx.pipeline import CompressOptions, compress  # noqa: E402
from sfp_onnx.planning import read_plan  # noqa: E402
from sfp_onnx.runtime.bench import BenchConfig, benchmark  # noqa: E402
from sfp_onnx.runtime.evaluate import evaluate_onnx  # noqa: E402
from sfp_onnx.training.objectives import DistillConfig  # noqa: E402
from sfp_onnx.training.sfp import SfpConfig  # noqa: E402
from sfp_onnx.training.train import TrainConfig  # noqa: E402

# Each arm: how it prunes ("compress" soft-prunes while fine-tuning; "hard" prunes once, then
# fine-tunes at rate 0), and its overrides of SfpConfig / DistillConfig defaults.
NO_KD = {"enabled": False}
# The design arms vary one choice at a time from the first soft-mask settings tried (pruning
# phase = first half of the steps, re-selection every 16 steps, ASFP ramp, L2 scores).
DESIGN = {"freeze": 0.5, "reselect_every": 16, "schedule": "asymptotic", "criterion": "l2"}


def _design(**sfp) -> dict:
    return {"kind": "compress", "sfp": {**DESIGN, **sfp}}


ARMS: dict[str, dict] = {
    "unpruned": {"kind": "unpruned", "distill": NO_KD},
    "hard": {"kind": "hard", "distill": NO_KD},
    "hard+kd": {"kind": "hard", "distill": {}},
    "hard+kd9": {"kind": "hard", "distill": {"weight": 0.9}},  # the pair of soft-kd9
    "paper": {
        "kind": "compress",
        "sfp": {"method": "sfp-paper", "schedule": "constant"},
        "distill": NO_KD,
    },
    "soft": {"kind": "compress"},  # compress's defaults
    "soft-nokd": {"kind": "compress", "distill": NO_KD},
    "soft-nobn": {"kind": "compress", "sfp": {"bn_recalibration": 0}},
    "soft-noins": {"kind": "compress", "insert_norms": False},
    "soft-kd1": {"kind": "compress", "distill": {"weight": 1.0, "temperature": 1.0}},
    "soft-kd9": {"kind": "compress", "distill": {"weight": 0.9, "temperature": 4.0}},
    "soft-kd3": {"kind": "compress", "distill": {"weight": 0.3}},
    # kept channels pulled toward the teacher's where layers read them (weight 1 ... 100;
    # the default, auto, is 100 up to 400 steps and 0 from 800: soft-nofm is the default
    # before auto, and equals soft at budget b)
    "soft-nofm": {"kind": "compress", "distill": {"features": 0.0}},
    **{
        f"soft-fm{w}": {"kind": "compress", "distill": {"features": float(w)}}
        for w in (1, 3, 10, 30, 100)
    },
    # weight 100 falling linearly to 0 over the whole run / its first half
    "soft-fm100-d100": {"kind": "compress", "distill": {"features": 100.0, "features_decay": 1.0}},
    "soft-fm100-d50": {"kind": "compress", "distill": {"features": 100.0, "features_decay": 0.5}},
    "soft-taylor": {"kind": "compress", "sfp": {"criterion": "taylor"}},
    "soft-oneshot": {"kind": "compress", "sfp": {"schedule": "constant", "freeze": 0.99}},
    # a longer soft phase than the default's first 10% of the steps: the first 30%
    "soft-f70": {"kind": "compress", "sfp": {"freeze": 0.7}},
    # the target rate from the first step (no ramp), re-chosen as the default does
    "soft-const": {"kind": "compress", "sfp": {"schedule": "constant"}},
    # hysteresis: a masked channel returns only with a score 10% / 25% above a kept one's
    # (0.1 is the default now; soft-h0 is the default before it, every swap allowed)
    "soft-h0": {"kind": "compress", "sfp": {"reselect_margin": 0.0}},
    "soft-h10": {"kind": "compress", "sfp": {"reselect_margin": 0.1}},
    "soft-h25": {"kind": "compress", "sfp": {"reselect_margin": 0.25}},
    # the design arms
    "design": _design(),
    "design-nokd": {**_design(), "distill": NO_KD},
    "design-st": _design(straight_through=True),
    "design-decay": _design(masked_scale="decay", schedule="constant"),
    "design-const": _design(schedule="constant"),
    "design-const-f75": _design(schedule="constant", freeze=0.75),
    "design-const-st": _design(schedule="constant", straight_through=True),
    "design-f25": _design(freeze=0.25),
    "design-f75": _design(freeze=0.75),
    "design-f90-r2": _design(freeze=0.9, reselect_every=2),
    "design-const-f90-r4": _design(schedule="constant", freeze=0.9, reselect_every=4),
    "design-taylor": _design(criterion="taylor"),
    "design-taylor-f75": _design(criterion="taylor", freeze=0.75),
    "design-taylor-const": _design(criterion="taylor", schedule="constant"),
    "design-taylor-nokd": {**_design(criterion="taylor"), "distill": NO_KD},
}
BUDGETS = {  # name: (epochs, training images, lr)
    "quickstart": (3, 10000, 0.02),  # the README's quick start
    "quickstart-5k": (3, 5000, 0.02),  # its earlier form, the budget of sfp_design_run1-5
    "b": (4, None, 0.03),  # compress's default lr (0.01 before; sfp_design.md)
    "short": (2, 10000, 0.01),
}
DEFAULT_ARMS = ["unpruned", "hard", "hard+kd", "paper", "soft-nokd", "soft"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "examples" / "resnet20_cifar10.onnx"))
    parser.add_argument(
        "--fold-bn", action="store_true",
        help="re-export --model (a zoo ResNet or VGG) with every BatchNorm folded, and use that",
    )  # fmt: skip
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=sorted(ARMS))
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    parser.add_argument(
        "--plan", help="PLAN.json from `sfp-onnx plan`: the pruned arms take its per-group "
        "widths instead of --rates and --round-to (the table's rate: its share removed)"
    )  # fmt: skip
    parser.add_argument(
        "--round-to", nargs="+", default=["auto", "none"], help="auto | none | K, one or more"
    )
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="b")
    parser.add_argument("--epochs", type=int, help="override the budget's epochs")
    parser.add_argument("--train-limit", type=int, help="override the budget's images (0: all)")
    parser.add_argument("--lr", type=float, help="override the budget's learning rate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-limit", type=int, default=None, help="test images (all: 10,000)")
    parser.add_argument("--monitor-limit", type=int, default=1000, help="per-epoch eval images")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="training seed (shuffling, augmentation): reruns at other seeds show the noise",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default="sfp_cifar10")
    parser.add_argument("--no-bench", action="store_true", help="skip the latency columns")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--keep", help="keep the written models in this folder (for a later --merge)"
    )
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON",
        help="no training: one table, plot and latency run over the arms of earlier runs' "
        "JSON files (their models kept with --keep, in the folder beside each JSON's 'keep'); "
        "FILE.json:ARM,ARM=NAME takes only those arms of that file (the second renamed: an "
        "arm whose defaults have changed since)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="1 epoch on 500 images")
    parser.add_argument("--out", default=None, help="results folder (default: results/)")
    args = parser.parse_args()
    epochs, limit, lr = BUDGETS[args.budget]
    args.epochs = args.epochs or epochs
    args.train_limit = limit if args.train_limit is None else (args.train_limit or None)
    args.lr = args.lr or lr
    if args.quick:
        args.epochs, args.train_limit, args.eval_limit, args.monitor_limit = 1, 500, 500, 200
    args.round_to = [None if r == "none" else r if r == "auto" else int(r) for r in args.round_to]
    if args.plan:  # args.plan stays the path: the report records the settings as given
        plan = read_plan(args.plan)
        args.rates, args.round_to = [round(plan.removed_share, 3)], [plan.round_to]
    return args


def _compress(source: Path, output: Path, sfp: SfpConfig, spec: dict, args, work: Path) -> dict:
    """``compress`` with the benchmark's budget; returns time and per-epoch history."""
    start = time.perf_counter()
    distill = replace(DistillConfig(), **spec.get("distill", {}))
    report = compress(
        source, output, sfp=sfp,
        data=DataConfig(
            "cifar10", root=args.data_root, train_limit=args.train_limit,
            eval_limit=args.monitor_limit, val_split=0.0,  # budget (b) trains on all 50,000
        ),
        training=TrainConfig(
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device=args.device,
            workers=args.workers, insert_norms=spec.get("insert_norms", True),
            seed=args.seed,
        ),
        distill=distill,
        options=CompressOptions(workdir=work / f"{output.stem}.work", bench=False),
    )  # fmt: skip
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "settings": report.settings,
        "history": [_epoch(e) for e in report.extra["training"]["epochs"]],
    }


def _epoch(record: dict) -> dict:
    return {
        "epoch": record["epoch"],
        "loss": record["train_loss"],
        "monitor_accuracy": record["eval_accuracy"],
        "extra": record["extra"],
    }


def run_arm(name: str, rate: float, round_to, args, work: Path) -> dict:
    """Train one arm at one rate and rounding; returns its record (file, time, history)."""
    spec = ARMS[name]
    source = Path(args.model)
    label = f"{name}@{rate}@{round_to}".replace("/", "_")
    output = work / f"{label}.onnx"
    if spec["kind"] == "unpruned":
        sfp = SfpConfig(rate=0.0)
        return {"file": str(output), **_compress(source, output, sfp, spec, args, work)}
    if spec["kind"] == "hard":
        oneshot = work / f"{label}.oneshot.onnx"
        if args.plan:
            pruned = api.prune(source, oneshot, plan=args.plan)
        else:
            pruned = api.prune(source, oneshot, rate=rate, round_to=round_to)
        hard = {**spec, "distill": {**spec.get("distill", {}), "teacher": str(source)}}
        record = _compress(oneshot, output, SfpConfig(rate=0.0), hard, args, work)
        return {"file": str(output), "oneshot": pruned.settings, **record}
    sfp = replace(SfpConfig(rate=rate, round_to=round_to), **spec.get("sfp", {}))
    if args.plan:  # as compress --plan: the plan's widths and rounding, its share as the rate
        plan = read_plan(args.plan)
        sfp = replace(sfp, plan=plan, rate=plan.removed_share, round_to=plan.round_to)
    return {"file": str(output), **_compress(source, output, sfp, spec, args, work)}


def run_arms(args, work: Path) -> list[dict]:
    arms = [{"arm": "original", "rate": 0.0, "round_to": None, "file": args.model}]
    if "unpruned" in args.arms:
        arms.append({"arm": "unpruned", "rate": 0.0, "round_to": None,
                     **run_arm("unpruned", 0.0, None, args, work)})  # fmt: skip
    for round_to in args.round_to:
        for rate in args.rates:
            for name in [a for a in args.arms if a != "unpruned"]:
                start = time.perf_counter()
                try:
                    record = run_arm(name, rate, round_to, args, work)
                except TrainingDiverged as exc:  # a measured outcome (e.g. a folded graph)
                    seconds = round(time.perf_counter() - start, 1)
                    record = {"file": None, "seconds": seconds, "diverged": str(exc)}
                arms.append({"arm": name, "rate": rate, "round_to": round_to, **record})
                print(f"{name} rate {rate} round-to {round_to}: {record['seconds']} s", flush=True)
    return arms


def measure(arms: list[dict], args) -> None:
    test = load_datasets(
        DataConfig("cifar10", root=args.data_root, eval_limit=args.eval_limit), (32, 32),
        with_train=False,
    ).test  # fmt: skip
    latency = {}
    if not args.no_bench:
        files = list(dict.fromkeys(arm["file"] for arm in arms if _on_disk(arm)))
        config = BenchConfig(batch_sizes=(1, 32), warmup=5, runs=30 if args.quick else 100)
        for result in benchmark(files, config).results:
            latency.setdefault(result.model, {})[result.batch_size] = result.latency_ms["p50"]
    for arm in arms:
        if not arm["file"]:  # diverged: no model was written
            arm.update(macs=None, params=None, top1=None, samples=None, latency_ms={})
            continue
        if arm.get("carried"):  # measured by its own run; the file is no longer here to time
            arm["latency_ms"] = {}
            continue
        stats = measure_model(arm["file"])
        accuracy = evaluate_onnx(arm["file"], test, num_classes=10)
        arm.update(
            macs=stats.macs, params=stats.params, top1=accuracy.top1, samples=accuracy.samples,
            latency_ms=latency.get(str(arm["file"]), {}),
        )  # fmt: skip


def render(arms: list[dict], args) -> str:
    base = arms[0]
    rows = []
    for arm in arms:
        if arm["top1"] is None:
            rows.append([arm["arm"], f"{arm['rate']:.1f}", _round_to(arm), "diverged", "-", "-",
                         "-", "-", "-", "-", "-", f"{arm.get('seconds', 0):.0f}"])  # fmt: skip
            continue
        lat = arm["latency_ms"]
        speed = f"{base['latency_ms'][32] / lat[32]:.2f}x" if lat else "-"
        rows.append([
            arm["arm"] + (" *" if arm.get("carried") else ""), f"{arm['rate']:.1f}", _round_to(arm),
            f"{arm['top1']:.2%}", f"{(arm['top1'] - base['top1']) * 100:+.2f}",
            f"{arm['macs'] / 1e6:.2f}M", f"{1 - arm['macs'] / base['macs']:.1%}",
            f"{arm['params'] / 1e3:.1f}k", f"{lat[1]:.3f}" if lat else "-",
            f"{lat[32]:.2f}" if lat else "-", speed, f"{arm.get('seconds', 0):.0f}",
        ])  # fmt: skip
    table = md_table(
        ["arm", "rate", "round-to", "top-1", "vs original", "MACs", "MACs cut", "params",
         "ms b1", "ms b32", "speedup b32", "train s"],
        rows,
    )  # fmt: skip
    budget = (
        f"{args.epochs} epochs per arm, lr {args.lr} cosine, batch {args.batch_size}, "
        f"train images: {args.train_limit or 'all 50,000'}, test images: {base['samples']}"
    )
    return f"Budget: {budget}.\n\n{table}\n"


def _round_to(arm: dict) -> str:
    """The rounding asked for, and what ``auto`` resolved to on this machine."""
    settings = arm.get("settings", {})
    resolved = settings.get("pruning", {}).get("round_to", settings.get("round_to"))
    resolved = resolved or arm.get("oneshot", {}).get("round_to")  # hard arms: their prune's
    asked = arm["round_to"]
    if asked == "auto" and resolved:
        return f"auto ({resolved})"
    return str(asked or "none")


def plot(arms: list[dict], path: Path) -> None:
    """Top-1 against MACs cut, one line per arm and rounding: every arm, and the top 6 points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple, list] = {}
    for arm in arms[1:]:
        if arm["rate"] > 0 and arm["top1"] is not None:  # unpruned runs (any seed, lr) cut nothing
            lines.setdefault((arm["arm"], arm["round_to"]), []).append(arm)
    fig, (whole, top) = plt.subplots(1, 2, figsize=(13, 5))
    for ax in (whole, top):
        _draw_lines(ax, arms, lines)
    best = max(100 * a["top1"] for a in arms if a["top1"] is not None)
    top.set_ylim(best - 6, best + 0.5)
    top.set_title("the same, top 6 points")
    whole.set_title(f"{Path(arms[0]['file']).stem} on CIFAR-10, equal fine-tuning budget per arm")
    arm_handles, _ = top.get_legend_handles_labels()
    styles = [  # the rounding and seed encodings, once for all arms
        matplotlib.lines.Line2D([], [], color="grey", linestyle=style, marker=marker, label=label)
        for style, marker, label in (
            ("-", None, "rounded (8, 16, auto)"), ("--", None, "round-to none"),
            ("none", "x", "other seeds"),
        )
    ]  # fmt: skip
    top.legend(handles=[*arm_handles, *styles], fontsize=7, loc="center left",
               bbox_to_anchor=(1.01, 0.5))  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_lines(ax, arms: list[dict], lines: dict[tuple, list]) -> None:
    """One color per arm, the line style per rounding; the original and unpruned as rules.

    Rows merged as ``ARM seed N`` take ARM's color, drawn as crosses without a line; the legend
    names each arm once.
    """
    import matplotlib.pyplot as plt

    base = arms[0]
    arm_of = {name: name.partition(" seed ")[0] for name, _ in lines}  # "soft seed 1" -> soft
    colors = {
        arm: plt.get_cmap("tab20")(i % 20) for i, arm in enumerate(sorted(set(arm_of.values())))
    }
    labelled: set[str] = set()  # one legend entry per arm; the styles are explained once
    by_seed_then_name = sorted(
        lines.items(), key=lambda kv: (arm_of[kv[0][0]] != kv[0][0], str(kv[0]))
    )
    for (name, round_to), points in by_seed_then_name:  # an arm's legend entry: its seed-0 line
        points.sort(key=lambda a: a["macs"], reverse=True)
        cut = [100 * (1 - a["macs"] / base["macs"]) for a in points]
        arm, seed = arm_of[name], arm_of[name] != name
        ax.plot(cut, [100 * a["top1"] for a in points], marker="x" if seed else "o",
                color=colors[arm], linestyle="none" if seed else "-" if round_to else "--",
                label="_" if arm in labelled else arm)  # fmt: skip
        labelled.add(arm)
    references = [arm for arm in arms if arm["arm"] in ("original", "unpruned")]
    highest = max((arm["top1"] for arm in references), default=None)
    for arm in references:  # the higher line labelled above, the other below: they lie close
        ax.axhline(100 * arm["top1"], color="grey", linewidth=0.8,
                   linestyle=":" if arm["arm"] == "original" else "-.")  # fmt: skip
        ax.text(0.01, 100 * arm["top1"], arm["arm"], fontsize=8, color="grey",
                transform=ax.get_yaxis_transform(),
                va="bottom" if arm["top1"] == highest else "top")  # fmt: skip
    ax.set_xlabel("MACs cut (%) of the written file")
    ax.set_ylabel("top-1 (%) on the CIFAR-10 test set")
    ax.grid(alpha=0.3)


def _on_disk(arm: dict) -> bool:
    return bool(arm["file"]) and not arm.get("carried")


def _renaming(name: str) -> tuple[str, str]:
    """``ARM`` -> (ARM, ARM); ``ARM=NAME`` -> (ARM, NAME)."""
    arm, _, new = name.partition("=")
    return arm, new or arm


def merged_arms(paths: list[str], model: str) -> list[dict]:
    """The arms of earlier runs (their files where --keep put them), the original once (as
    ``model``: the runs may have read it from another checkout). An arm whose file is gone
    (another machine's run) is carried: its accuracy, MACs and params as its run measured
    them on the file it wrote, with no latency."""
    arms: list[dict] = [{"arm": "original", "rate": 0.0, "round_to": None, "file": model}]
    for entry in paths:
        path, selected, names = entry.partition(".json:")
        path = f"{path}.json" if selected else path  # the split took the suffix off
        wanted = dict(_renaming(n) for n in names.split(",")) if names else None
        data = json.loads(Path(path).read_text())
        keep = Path(data["settings"]["keep"])
        for arm in data["arms"]:
            if arm["arm"] == "original" or (wanted is not None and arm["arm"] not in wanted):
                continue
            if wanted is not None:
                arm = {**arm, "arm": wanted[arm["arm"]]}
            file = Path(arm["file"]) if arm["file"] else None
            if file is not None and not file.is_absolute():
                file = keep / file
            carried = file is not None and not file.exists()
            arms.append({**arm, "file": str(file) if file else None, "carried": carried})
    return arms


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args.name)
    out = Path(args.out or default_out(args.quick))
    with tempfile.TemporaryDirectory(prefix="sfp-cifar10-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.merge:
            arms = merged_arms(args.merge, args.model)
        else:
            if args.fold_bn:
                folded = work / f"{Path(args.model).stem}_folded.onnx"
                args.model = str(fold_zoo_export(Path(args.model), folded))
            arms = run_arms(args, work)
        measure(arms, args)
        for arm in arms:
            arm["file"] = Path(arm["file"]).name if arm["file"] else None
    body = render(arms, args)
    notes = [
        "Published SFP numbers (FPGM paper tables) for ResNet-20 trained from scratch for 200 "
        "epochs: 92.20 -> 90.83 at 42.2% FLOPs cut. Here the arms fine-tune a trained model "
        "for a short budget, on JPEG-degraded CIFAR-10 (see the data's README).",
        "round-to auto resolves per machine (16 with AVX-512, else 8); see settings in the JSON.",
    ]
    if any(arm.get("carried") for arm in arms):
        notes.append(
            "Rows marked * are carried from their own run's JSON (its model is not on this "
            "machine): top-1, MACs and params as that run measured them on the file it wrote; "
            "no latency."
        )
    out.mkdir(parents=True, exist_ok=True)
    plot(arms, out / f"{args.name}.png")
    body += f"\n![top-1 against MACs cut]({args.name}.png)\n"
    md, _ = write_results(
        run, out, title=f"Soft pruning on CIFAR-10: {Path(args.model).stem}", body=body,
        data={"arms": arms, "settings": vars(args)}, notes=notes,
    )  # fmt: skip
    print(md.read_text())


if __name__ == "__main__":
    main()
