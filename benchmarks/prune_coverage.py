"""How much of each CNN family `prune` can cut: MACs removed at rate 0.3, and what blocks the rest.

For every torchvision classifier family (sized for 64 px inputs, 10 classes, randomised
BatchNorm statistics, as the tests export them) and the small generated patterns of
``tests/exports.py``, exported by the legacy exporter (opset 17, BatchNorm kept) and by the
dynamo exporter: ``sfp_onnx.prune --rate 0.3 --round-to none``, the MACs of the written file
against the input's, whether it is exact (onnxruntime, masked vs slim, real CIFAR-10 images),
how many channel groups are prunable, and the reasons the analysis gives for the blocked
ones (the graph input and the classifier output, blocked in every network, left out). With
no rounding the nominal cut of a fully prunable network is 1 - 0.7² ≈ 51%.

Usage (from the repository root)::

    python benchmarks/prune_coverage.py            # ~4 min on 2 cores
    python benchmarks/prune_coverage.py --quick    # two models, into a scratch folder
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sfp_onnx
from benchmarks._results import Run, default_out, md_table, write_results
from tests.exports import (
    DepthwiseMultiplierNet,
    GroupedNet,
    export,
    randomize_norms,
    torchvision_model,
)

# family -> torchvision model names
FAMILIES = {
    "ResNet": ["resnet18", "resnet50"],
    "Wide ResNet": ["wide_resnet50_2"],
    "ResNeXt (grouped 3x3, 32 groups)": ["resnext50_32x4d"],
    "RegNet (grouped, group width 8/16)": ["regnet_x_400mf", "regnet_y_400mf"],
    "VGG": ["vgg11_bn"],
    "MobileNet (depthwise)": ["mobilenet_v2", "mobilenet_v3_small"],
    "EfficientNet (depthwise + SE)": ["efficientnet_b0"],
    "MNASNet": ["mnasnet0_5"],
    "DenseNet (concat)": ["densenet121"],
    "GoogLeNet (concat)": ["googlenet"],
    "SqueezeNet (concat)": ["squeezenet1_0"],
    "ShuffleNetV2 (channel split + shuffle)": ["shufflenet_v2_x1_0"],
    "ConvNeXt (LayerNorm, depthwise 7x7)": ["convnext_tiny"],
}
PATTERNS = {
    "grouped convs, 4 and 2 groups (tests/exports.py GroupedNet)": lambda: GroupedNet(16),
    "depthwise, multiplier 2 (DepthwiseMultiplierNet)": lambda: DepthwiseMultiplierNet(8),
}
_EVERYWHERE = ("channels of graph input", "reaches graph output")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["kept17", "dynamo"])
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="two models, legacy export only")
    args = parser.parse_args()
    if args.quick:
        args.variants = ["kept17"]
    args.out = args.out or default_out(args.quick)
    return args


def blocking_reasons(result) -> list[str]:
    """The distinct reasons of the blocked groups (as `analyze` gives them), most common first."""
    reasons = Counter()
    for group in result.groups:
        if group.prunable or group.blocked is None:
            continue
        for reason in group.blocked.split("; "):
            if not reason.startswith(_EVERYWHERE):
                reasons[_generic(reason)] += 1
    return [f"{reason} (x{count})" for reason, count in reasons.most_common(3)]


def _generic(reason: str) -> str:
    """A reason without its node name, so one per kind is listed."""
    head, _, rest = reason.partition("'")
    _, _, tail = rest.partition("'")
    return (head + "…" + tail).strip() if rest else reason


def measure(label: str, family: str, module, variant: str, folder: Path, rate: float) -> dict:
    source = export(module, folder / f"{label}_{variant}.onnx", variant)
    started = time.perf_counter()
    result = sfp_onnx.prune(source, folder / f"{label}_{variant}.slim.onnx", rate=rate,
                            round_to=None)  # fmt: skip
    return {
        "family": family,
        "model": label,
        "export": variant,
        "macs_before": result.before.macs,
        "macs_after": result.after.macs,
        "macs_cut": result.macs_reduction,
        "params_cut": 1 - result.after.params / result.before.params,
        "exact": result.verification.exact,
        "max_abs_diff": result.verification.max_abs_diff,
        "groups": len(result.groups),
        "prunable": sum(g.prunable for g in result.groups),
        "blocked_by": blocking_reasons(result),
        "seconds": round(time.perf_counter() - started, 1),
    }


def cases(quick: bool):
    """(label, family, module factory) for every model measured."""
    for family, names in FAMILIES.items():
        for name in names[:1] if quick else names:
            if quick and name not in ("resnet18", "resnext50_32x4d"):
                continue
            yield name, family, lambda name=name: torchvision_model(name)
    if not quick:
        for label, factory in PATTERNS.items():
            yield label.split(" (")[0], label, lambda f=factory: randomize_norms(f())


def render(rows: list[dict]) -> str:
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    table = md_table(
        ["family", "model", "export", "MACs", "MACs cut", "params cut", "exact",
         "prunable groups", "what still blocks (besides the graph input and output)"],
        [[r["family"], r["model"], r["export"], f"{r['macs_before'] / 1e6:.1f}M",
          f"{r['macs_cut']:.1%}", f"{r['params_cut']:.1%}", "yes" if r["exact"] else "NO",
          f"{r['prunable']} of {r['groups']}", "; ".join(r["blocked_by"]) or "-"]
         for r in rows],
    )  # fmt: skip
    lines = [f"- {r['model']} ({r['export']}): the export failed: `{r['error']}`" for r in failed]
    tail = "\n\nNot measured:\n\n" + "\n".join(lines) if lines else ""
    return f"`prune --rate 0.3 --round-to none`, 64x64 inputs, 10 classes.\n\n{table}{tail}\n"


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    run = Run("prune_coverage")
    rows = []
    with tempfile.TemporaryDirectory(prefix="sfp-coverage-") as tmp:
        for label, family, factory in cases(args.quick):
            for variant in args.variants:
                try:
                    row = measure(label, family, factory(), variant, Path(tmp), args.rate)
                except Exception as exc:  # an exporter that cannot export this model
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    row = {"family": family, "model": label, "export": variant, "error": error}
                    print(f"{label} {variant}: not exported ({error})", flush=True)
                else:
                    print(f"{label} {variant}: {row['macs_cut']:.1%} cut, exact {row['exact']}",
                          flush=True)  # fmt: skip
                rows.append(row)
    notes = ["Random weights: the cut and exactness do not depend on the values; every "
             "model is exported inside the run (tests/exports.py)."]  # fmt: skip
    md, _ = write_results(
        run, args.out, title="What `prune` can cut, by CNN family", body=render(rows),
        data={"rate": args.rate, "round_to": None, "rows": rows}, notes=notes,
    )  # fmt: skip
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
