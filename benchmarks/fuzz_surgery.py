"""Fuzzing the surgery at scale: the properties of tests/test_fuzz_surgery.py on many more nets.

Random small CNNs (:mod:`tests.fuzz_models`: conv/BN/act, residual blocks with identity or
projection shortcuts, concatenations, depthwise separable and SE blocks, pooling, GAP or
Flatten heads with one or two Linear layers) exported through torch — BatchNorm kept or
folded at opset 13/17 with the TorchScript exporter, and about one in five with the dynamo
exporter, which the test suite leaves out for time. Two properties (:mod:`tests.fuzz_checks`):

- slim: nets soft-pruned in torch (random groups, random channels, each producer zeroing
  them exactly or in a way that must keep them) → ``sfp_onnx.slim``;
- prune: unmasked nets → ``sfp_onnx.prune`` at a random rate in [0, 0.9), criterion and
  rounding.

Each example must be exact in onnxruntime (random and real CIFAR-10 inputs, max|Δ| ≤
1e-4·max|y|), have the Conv/Gemm widths an independent oracle computes from the torch
weights, and leave nothing a second slim would remove. A failing example is recorded with
everything needed to rebuild it (the drawn case and the error), never raised; passing ones
only in the counts (the seed redraws them all).

    python benchmarks/fuzz_surgery.py                # 1000 + 500 examples, ~8 min on 2 cores
    python benchmarks/fuzz_surgery.py --quick        # smoke run, results to a temp folder
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from benchmarks._results import Run, default_out, md_table, write_results  # noqa: E402
from sfp_onnx.graph.soft_prune import CRITERIA  # noqa: E402
from tests.fuzz_checks import check_prune, check_slim  # noqa: E402
from tests.fuzz_models import (  # noqa: E402
    BLOCK_KINDS,
    EXPORTS,
    ConcatSpec,
    ConvSpec,
    DepthwiseSpec,
    GroupedSpec,
    GroupNormSpec,
    PoolSpec,
    ResidualSpec,
    SESpec,
    SplitSpec,
    fuzz_cases,
)

VARIANTS = (*EXPORTS, "dynamo")  # sampled evenly: one example in five is a dynamo export


def parse_args() -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slim-examples", type=int, default=1000)
    parser.add_argument("--prune-examples", type=int, default=500)
    parser.add_argument("--max-blocks", type=int, default=6, help="blocks per net (2 to this)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16], help="input sizes")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 + 5 examples")
    args = parser.parse_args()
    if args.quick:
        args.slim_examples, args.prune_examples = 10, 5
    args.out = args.out or default_out(args.quick)
    return args


def block_names(case) -> list[str]:
    """The kinds of a case's blocks and head, with the variant of each kind."""
    detail = {
        ConvSpec: lambda b: {"bn": "+ BN", "bias": "+ bias", "none": "no bias"}[b.norm],
        ResidualSpec: lambda b: "projection" if b.projection else "identity",
        ConcatSpec: lambda b: (
            ("input + branch" if not b.second else "two branches") + (", then BN" if b.norm else "")
        ),
        SESpec: lambda b: b.gate,
        PoolSpec: lambda b: b.kind,
        DepthwiseSpec: lambda b: f"stride {b.stride}",
        GroupedSpec: lambda b: f"{b.groups} groups, stride {b.stride}",
        SplitSpec: lambda b: "GLU gate" if b.gate else "two convs, concat",
        GroupNormSpec: lambda b: f"{b.groups} groups of {b.per_group}",
    }
    names = [f"{BLOCK_KINDS[type(b)]} ({detail[type(b)](b)})" for b in case.spec.blocks]
    head = case.spec.head
    names.append("head: Flatten" if head.flatten else "head: GAP")
    names.append("head: 2 Linear" if head.hidden else "head: 1 Linear")
    return names


def record(prop: str, case, started: float, outcome=None, error: BaseException | None = None):
    """One example's line in the JSON: what it was, how long it took, what it did."""
    entry = {
        "property": prop,
        "variant": case.variant,
        "blocks": block_names(case),
        "seconds": round(time.perf_counter() - started, 3),
        "ok": error is None,
    }
    if outcome is not None:
        entry.update(
            layers=outcome.layers,
            groups=outcome.groups,
            blocked_groups=outcome.blocked,
            channels_before=outcome.channels_before,
            channels_after=outcome.channels_after,
            ways=dict(outcome.ways),
            max_rel_diff=outcome.max_abs_diff / max(outcome.max_abs_output, 1e-30),
        )
    if error is not None:
        entry.update(
            case=repr(case),
            error=f"{type(error).__name__}: {error}",
            where="".join(traceback.format_tb(error.__traceback__, limit=-3)),
        )
    return entry


def run_property(prop: str, count: int, args: argparse.Namespace, log: list[dict]) -> None:
    """Draw ``count`` examples with hypothesis and check each; failures are logged, not raised."""
    cases = fuzz_cases(variants=VARIANTS, max_blocks=args.max_blocks, sizes=args.sizes)
    extra = {
        "rate": st.floats(0.0, 0.9, exclude_max=True),
        "criterion": st.sampled_from(sorted(CRITERIA)),
        "round_to": st.sampled_from((None, 1, 2, 4, 8)),
    }

    @hypothesis_seed(args.seed)
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases, **(extra if prop == "prune" else {}))
    def one(case, **options):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            try:
                if prop == "slim":
                    outcome = check_slim(case, Path(folder))
                else:
                    outcome = check_prune(case, Path(folder), **options)
            except Exception as error:  # a failure is a result: record it and go on
                log.append(record(prop, case, started, error=error) | {"options": options})
                print(f"  FAIL {prop} {case.variant}: {type(error).__name__}", flush=True)
                return
        log.append(record(prop, case, started, outcome) | {"options": options})
        if len(log) % 50 == 0:
            print(f"  {len(log)} examples", flush=True)

    one()


def property_rows(log: list[dict]) -> list[list[object]]:
    """Per property: examples, failures, channels removed of all, worst error, median time."""
    by_prop = collections.defaultdict(list)
    for entry in log:
        by_prop[entry["property"]].append(entry)
    return [
        [
            prop,
            len(rows),
            sum(not r["ok"] for r in rows),
            sum(r.get("channels_before", 0) - r.get("channels_after", 0) for r in rows),
            sum(r.get("channels_before", 0) for r in rows),
            max((r.get("max_rel_diff", 0.0) for r in rows), default=0.0),
            round(statistics.median(r["seconds"] for r in rows), 3),
        ]
        for prop, rows in by_prop.items()
    ]


def variant_rows(log: list[dict]) -> list[list[object]]:
    """Per export variant: slim and prune examples, failures, mean seconds per example."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    seconds: dict[str, float] = collections.defaultdict(float)
    for entry in log:
        counts[entry["variant"]][entry["property"]] += 1
        counts[entry["variant"]]["failures"] += not entry["ok"]
        seconds[entry["variant"]] += entry["seconds"]
    return [
        [v, c["slim"], c["prune"], c["failures"], round(seconds[v] / (c["slim"] + c["prune"]), 3)]
        for v, c in sorted(counts.items())
    ]


def summarize(log: list[dict]) -> tuple[str, dict]:
    """The Markdown body and the JSON summary."""
    totals, variants = property_rows(log), variant_rows(log)
    blocks = collections.Counter(name for entry in log for name in entry["blocks"])
    nets_with = collections.Counter(name for entry in log for name in set(entry["blocks"]))
    ways = collections.Counter()
    for entry in log:
        ways.update(entry.get("ways", {}))
    failures = [entry for entry in log if not entry["ok"]]
    failure_rows = [
        [f["property"], f["variant"], f["error"][:200], f"`{f['case']}`"] for f in failures
    ]
    headers = ["property", "examples", "failures", "channels removed", "channels before",
               "max Δ/max y", "median s"]  # fmt: skip
    body = "\n".join(
        [
            "## Properties\n",
            md_table(headers, [[*row[:5], f"{row[5]:.2g}", row[6]] for row in totals]),
            "\nchannels: output widths of every Conv and Gemm, summed over the examples; "
            "Δ/y: the largest max|Δ| / max|y| of an example (1e-4 allowed).\n",
            "## By export\n",
            md_table(["export", "slim", "prune", "failures", "mean s"], variants),
            "\n## By block\n",
            md_table(
                ["block", "occurrences", "nets with it"],
                [[name, blocks[name], nets_with[name]] for name in sorted(blocks)],
            ),
            "\n## How the slim examples' channels were zeroed\n",
            "Per (producer, group) pair; `sfp` and `norm` make a channel exactly zero, the "
            "others (one producer in about half the chosen groups) must keep it.\n",
            md_table(["way", "pairs"], sorted(ways.items())),
            "\n## Failures\n",
            md_table(["property", "export", "error", "case"], failure_rows)
            if failures
            else "None.",
        ]
    )
    keys = ("examples", "failures", "channels_removed", "channels_before", "max_rel_diff",
            "median_seconds")  # fmt: skip
    summary = {
        "examples": len(log),
        "failures": len(failures),
        "by_property": {row[0]: dict(zip(keys, row[1:], strict=True)) for row in totals},
        "by_variant": {
            row[0]: dict(zip(("slim", "prune", "failures", "mean_seconds"), row[1:], strict=True))
            for row in variants
        },
        "by_block": dict(blocks),
        "nets_with_block": dict(nets_with),
        "ways": dict(ways),
        "failed_examples": failures,
    }
    return body, summary


def main() -> None:
    """Run both properties and write the results."""
    args = parse_args()
    torch.set_num_threads(1)
    run = Run("fuzz_surgery", "hypothesis")
    log: list[dict] = []
    started = time.perf_counter()
    for prop, count in (("slim", args.slim_examples), ("prune", args.prune_examples)):
        print(f"{prop}: {count} examples", flush=True)
        run_property(prop, count, args, log)
    body, summary = summarize(log)
    md, js = write_results(
        run,
        args.out,
        title="Surgery fuzzing: random CNNs, random masks, exact slim models",
        body=body,
        data={
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "summary": summary,
        },
        notes=[
            "Same properties as tests/test_fuzz_surgery.py (which runs 150 + 150 examples "
            "without the dynamo exporter); hypothesis generates, no shrinking.",
            f"{len(log)} examples in {time.perf_counter() - started:.0f} s, one onnxruntime "
            "and one torch thread.",
        ],
    )
    print(f"wrote {md}, {js}")


if __name__ == "__main__":
    main()
