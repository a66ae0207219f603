"""``sfp-onnx bench``: time ONNX models in onnxruntime and compare them with the first one.

Maps the options to :class:`sfp_onnx.runtime.bench.BenchConfig`, calls
:func:`sfp_onnx.runtime.bench.benchmark` with a progress bar, prints the summary table and, with
``--json``, writes the report.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sfp_onnx.cli._render import console, human

from sfp_onnx.runtime.session import OPT_LEVELS, PROVIDERS

__all__ = ["bench"]


@click.command("bench")
@click.argument("models", nargs=-1, required=True, metavar="MODEL [MODEL ...]")
@click.option(
    "-b",
    "--batch-size",
    "batch_sizes",
    type=int,
    multiple=True,
    default=(1,),
    show_default=True,
    help="Samples per run; repeat for several (-b 1 -b 32).",
)
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs first.")
@click.option(
    "--runs", type=int, default=50, show_default=True, help="Timed runs per model and batch."
)
@click.option("--threads", type=int, help="Intra-op threads per session [default: all cores].")
@click.option(
    "--provider",
    default="auto",
    show_default=True,
    metavar="|".join(PROVIDERS),
    help="onnxruntime execution provider; auto takes CUDA when a GPU is usable.",
)
@click.option(
    "--opt-level",
    default="all",
    show_default=True,
    metavar="|".join(OPT_LEVELS),
    help="onnxruntime graph optimisation level.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    help="Also write the results, machine and versions as JSON to this file.",
)
def bench(
    models: tuple[str, ...],
    batch_sizes: tuple[int, ...],
    warmup: int,
    runs: int,
    threads: int | None,
    provider: str,
    opt_level: str,
    json_path: str | None,
) -> None:
    """Measure latency (p50/p90/p99/mean), throughput, MACs, parameters and size.

    The models run interleaved (A B A B ...) so drift of the machine falls on all of them
    alike; the table gives each model's speedup (p50) and MACs relative to the FIRST model.
    Models with a dynamic batch axis run at every --batch-size; a fixed-batch model only at
    its own batch.

    \b
    Examples:
      sfp-onnx bench resnet.onnx resnet_slim.onnx
      sfp-onnx bench a.onnx b.onnx -b 1 -b 32 --threads 1 --json bench.json
    """
    from sfp_onnx._io import check_writable, write_json
    from sfp_onnx.runtime.bench import BenchConfig

    if json_path:
        check_writable(json_path, inputs=models)
    config = BenchConfig(
        batch_sizes=batch_sizes,
        warmup=warmup,
        runs=runs,
        threads=threads,
        provider=provider,
        opt_level=opt_level,
    )
    report = _run_with_progress(models, config)
    _print_unsqueezed(_summary_table(report, config))
    if json_path:
        write_json(json_path, report.to_json())
        console.print(f"wrote {json_path}", soft_wrap=True)


_NUMERIC_COLUMNS = (
    "batch",
    "p50",
    "p90",
    "p99",
    "mean",
    "img/s",
    "MACs",
    "params",
    "size",
    "speedup",
    "MACs ratio",
)


def _print_unsqueezed(table: Table) -> None:
    """Fit a terminal; into a file or pipe, print at the table's natural width."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(width=max(console.width, natural), highlight=False).print(table)


def _run_with_progress(models: tuple[str, ...], config):
    from sfp_onnx.runtime.bench import benchmark

    columns = (
        TextColumn("benchmarking"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("bench", total=None)
        return benchmark(
            models,
            config,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )


def _summary_table(report, config) -> Table:
    from sfp_onnx.runtime.bench import speedups

    machine = report.machine
    table = Table(
        title="sfp-onnx bench",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
        caption=(
            f"provider {report.results[0].provider} on {machine['cpu']} ({machine['cores']} "
            f"cores), {machine['gpu'] or 'no GPU'}; "
            f"onnxruntime {report.versions['onnxruntime']}; {config.runs} runs after "
            f"{config.warmup} warm-up, interleaved; latency in ms per batch"
        ),
    )
    table.add_column("model", min_width=10, no_wrap=True)
    for header in _NUMERIC_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    ratio = speedups(report)
    firsts: dict[int, int] = {}
    for r in report.results:
        first_macs = firsts.setdefault(r.batch_size, r.macs)
        latency = [f"{r.latency_ms[k]:.3f}" for k in ("p50", "p90", "p99", "mean")]
        table.add_row(
            Path(r.model).name,
            str(r.batch_size),
            *latency,
            f"{r.throughput:,.0f}",
            human(r.macs),
            human(r.params),
            human(r.file_bytes, "B"),
            f"{ratio[(r.model, r.batch_size)]:.2f}x",
            f"{r.macs / first_macs:.2f}" if first_macs else "-",
        )
    return table
