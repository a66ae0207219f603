"""sfp-onnx ``prune`` against onnxsim's ``apply_structured_pruning`` at equal sparsity.

Both tools remove the lowest-L2 fraction of channels, on the same ONNX files. Four outputs
per model and export (BatchNorm folded into the Convs, or kept as nodes):

1. sfp-onnx ``prune`` of the original (rate r, no rounding);
2. onnxsim ``apply_structured_pruning(sparsity=r)`` of the original;
3. onnxsim on sfp-onnx's masked model (the same channels already zeroed), as written: the
   case of a model trained with soft pruning, where removing the zeros must change nothing;
4. the same with the file's ``value_info`` (intermediate shapes) stripped first.

Each output is checked: valid (ONNX checker, runs in onnxruntime, same output shape),
exact (reproduces its reference: the masked model for 1, 3 and 4), MACs and parameters cut,
tool time, and latency against the original (interleaved, batch 1 and 32).

The default rate is 0.25: every channel count of these models is a multiple of 4, so the
two tools' counts agree (sfp-onnx removes floor(r*C), onnxsim keeps round((1-r)*C); at 0.3 a
16-channel layer loses 4 with one and 5 with the other, and onnxsim would then cut a live
channel of the masked model whatever its surgery does).

Usage (from the repository root; needs ``pip install -e '.[bench]'``)::

    python benchmarks/peer_onnxsim.py            # ~6 min on 2 cores
    python benchmarks/peer_onnxsim.py --quick    # smoke run, into a scratch folder
"""

from __future__ import annotations

import argparse
import tempfile
import time
from importlib import metadata
from pathlib import Path

import onnx
from _models import bench_on_budget, export_model, prune_variant
from _results import Run, default_out, md_table, write_results

from sfp_onnx.errors import SfpError
from sfp_onnx.graph.measure import measure_model
from sfp_onnx.runtime.bench import speedups
from sfp_onnx.runtime.verify import verify_models

MODELS = ("resnet56@32", "resnet18@64", "resnet50@64", "mobilenet_v2@64")
LEGEND = """\
- *valid*: passes `onnx.checker` (full check), runs in onnxruntime, and gives the original's
  output shape.
- *exact*: reproduces its reference, sfp-onnx's masked model (the original with the chosen
  channels zeroed), within 1e-4 of max |y| on random inputs. A one-shot cut of the original
  changes the function by design; rows 3 and 4 (onnxsim given the masked model, whose zeroed
  channels have the lowest L2 norm) test whether its cut is exact.
- *time*: the tool's call. sfp-onnx's includes the analysis, the onnxruntime exactness check,
  writing both files and measuring them; onnxsim's is the pruning alone, in memory.
- *MACs cut*, *params cut*: of the written file against the original.
- *speedup*: p50 latency of the original / of the output, interleaved runs.
"""
TOOLS = ("sfp-onnx prune", "onnxsim", "onnxsim on masked", "onnxsim on masked, no value_info")


def parse_args() -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="name@size specs")
    parser.add_argument("--rate", type=float, default=0.25, help="sparsity of both tools")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=(1, 32))
    parser.add_argument("--seconds", type=float, default=12.0, help="timing budget per cell")
    parser.add_argument("--workdir", type=Path, help="keep the ONNX files here (default: temp)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one small model")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch_sizes, args.seconds = ["resnet56@32"], [1], 1.0
    args.out = args.out or default_out(args.quick)
    return args


def run_onnxsim(source: Path, out: Path, rate: float) -> tuple[Path | None, float, str | None]:
    """onnxsim's structured pruning of ``source`` into ``out``: (path, seconds, error)."""
    from onnxsim.pruning import apply_structured_pruning

    started = time.perf_counter()
    try:
        model = apply_structured_pruning(str(source), sparsity=rate)
    except Exception as exc:  # a peer's failure is a result, not a crash
        return None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"[:200]
    seconds = time.perf_counter() - started
    onnx.save(model, str(out))
    return out, seconds, None


def strip_value_info(source: Path, out: Path) -> Path:
    """A copy of ``source`` without the intermediate shapes (``graph.value_info``)."""
    model = onnx.load(str(source))
    del model.graph.value_info[:]
    onnx.save(model, str(out))
    return out


def validity(path: Path, source: Path) -> tuple[bool, str]:
    """ONNX checker, an onnxruntime run and the original's output shape."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        check = verify_models(source, path)  # raises on another output shape
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, SfpError) as exc:
        return False, str(exc).strip().splitlines()[0][:160]
    return True, f"top-1 agreement with the original {check.top1_agreement:.0%}"


def exactness(reference: Path, candidate: Path) -> dict:
    """Does ``candidate`` reproduce ``reference`` (relative max |Δ| within 1e-4)?"""
    try:
        v = verify_models(reference, candidate)
    except SfpError as exc:
        return {"exact": False, "detail": str(exc)}
    rel = v.max_abs_diff / max(v.max_abs_reference, 1e-30)
    return {"exact": v.exact, "max_abs_diff": v.max_abs_diff, "relative": rel}


def compare(spec: str, fold_bn: bool, args: argparse.Namespace, folder: Path) -> dict:
    """The three outputs of one model export, checked and timed."""
    source = export_model(spec, folder, fold_bn=fold_bn)
    ours = prune_variant(source, folder, args.rate, "none", masked=True)
    masked = ours.path.with_name(f"{ours.path.stem}_masked.onnx")
    sim, sim_s, sim_err = run_onnxsim(source, folder / f"{source.stem}_onnxsim.onnx", args.rate)
    simm, simm_s, simm_err = run_onnxsim(
        masked, folder / f"{source.stem}_masked_onnxsim.onnx", args.rate
    )
    stripped = strip_value_info(masked, folder / f"{source.stem}_masked_novi.onnx")
    sims, sims_s, sims_err = run_onnxsim(
        stripped, folder / f"{source.stem}_masked_novi_onnxsim.onnx", args.rate
    )
    before = measure_model(source)
    rows = {
        TOOLS[0]: {"path": ours.path, "seconds": ours.seconds, "error": None, "reference": masked},
        TOOLS[1]: {"path": sim, "seconds": sim_s, "error": sim_err, "reference": None},
        TOOLS[2]: {"path": simm, "seconds": simm_s, "error": simm_err, "reference": masked},
        TOOLS[3]: {"path": sims, "seconds": sims_s, "error": sims_err, "reference": masked},
    }
    for row in rows.values():
        if row["path"] is None:
            row.update(valid=False, detail=row["error"])
            continue
        row["valid"], row["detail"] = validity(row["path"], source)
        after = measure_model(row["path"])
        row["macs_cut"] = 1 - after.macs / before.macs
        row["params_cut"] = 1 - after.params / before.params
        if row["reference"] is not None and row["valid"]:
            row["exactness"] = exactness(row["reference"], row["path"])
    timed = [source, *(r["path"] for r in rows.values() if r["valid"])]
    for batch in args.batch_sizes:
        report, runs = bench_on_budget(timed, batch, seconds=args.seconds)
        ratio = speedups(report)
        for row in rows.values():
            if row["valid"]:
                row[f"speedup_b{batch}"] = ratio[(str(row["path"]), batch)]
        for row in rows.values():
            row[f"runs_b{batch}"] = runs
    for row in rows.values():
        row["path"] = row["path"].name if row["path"] else None
        row["reference"] = row["reference"].name if row["reference"] else None
    return {
        "model": spec,
        "export": "BN folded" if fold_bn else "BN kept",
        "macs": before.macs,
        "params": before.params,
        "tools": rows,
    }


def table(results: list[dict], batches: list[int]) -> str:
    """All comparisons as one Markdown table."""
    headers = [
        "model",
        "export",
        "tool (input)",
        "valid",
        "exact",
        "MACs cut",
        "params cut",
        "time",
        *(f"speedup b{b}" for b in batches),
    ]
    rows = []
    for result in results:
        for tool, row in result["tools"].items():
            exact = "— (one-shot)"
            if "exactness" in row:
                e = row["exactness"]
                rel = f" (rel. {e['relative']:.1e})" if "relative" in e else ""
                exact = ("yes" if e["exact"] else "**no**") + rel
            cells = [
                result["model"],
                result["export"],
                tool,
                "yes" if row["valid"] else "**no**",
                exact if row["valid"] else "-",
            ]
            if row["valid"]:
                cells += [
                    f"{row['macs_cut']:.1%}",
                    f"{row['params_cut']:.1%}",
                    f"{row['seconds']:.2f} s",
                    *(f"{row[f'speedup_b{b}']:.2f}×" for b in batches),
                ]
            else:
                cells += ["-", "-", f"{row['seconds']:.2f} s", *("-" for _ in batches)]
            rows.append(cells)
    return md_table(headers, rows)


def main() -> None:
    """Run the benchmark and write its results."""
    args = parse_args()
    run = Run("peer_onnxsim", "onnxsim")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        results = []
        for spec in args.models:
            for fold_bn in (True, False):
                print(f"{spec} ({'BN folded' if fold_bn else 'BN kept'})", flush=True)
                results.append(compare(spec, fold_bn, args, folder))
    batches = list(args.batch_sizes)
    failures = [
        f"{r['model']} ({r['export']}), {tool}: {row['detail']}"
        for r in results
        for tool, row in r["tools"].items()
        if not row["valid"]
    ]
    body = "\n".join(
        [
            f"Both tools at sparsity {args.rate}: sfp-onnx `prune --rate {args.rate}` (no "
            f"rounding) and onnxsim {metadata.version('onnxsim')} "
            f"`onnxsim.pruning.apply_structured_pruning(model, sparsity={args.rate})`.\n",
            LEGEND,
            table(results, batches),
            *(["\nFailures:\n", *(f"- {f}" for f in failures)] if failures else []),
        ]
    )
    md, js = write_results(
        run,
        args.out,
        title="sfp-onnx prune vs onnxsim apply_structured_pruning",
        body=body,
        data={"rate": args.rate, "results": results},
        notes=["Random weights; onnxsim is not a dependency of sfp-onnx (extra `bench`)."],
    )
    print(f"wrote {md}, {js}")


if __name__ == "__main__":
    main()
