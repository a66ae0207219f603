"""``sfp-onnx eval``: top-1/top-5 accuracy of an ONNX classifier on a dataset.

Maps the options to :class:`sfp_onnx.data.datasets.DataConfig` and calls
:func:`sfp_onnx.runtime.evaluate.evaluate_onnx`; shows a progress bar and a table.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sfp_onnx.data.names import DATASETS
from sfp_onnx.runtime.session import PROVIDERS

__all__ = ["eval_command"]


@click.command("eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    "data_name",
    type=click.Choice(DATASETS),
    required=True,
    help="Dataset to evaluate on (its test split).",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    help="Dataset folder: train/ and test/ image folders, or torchvision's CIFAR "
    "batches. Without it CIFAR is downloaded to ~/.cache/sfp-onnx/data.",
)
@click.option("--limit", type=int, help="Evaluate a class-balanced subset of N test images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --limit subset.")
@click.option(
    "--batch-size",
    type=int,
    default=256,
    show_default=True,
    help="Images per batch (models with a fixed batch size run that many).",
)
@click.option(
    "--provider",
    type=click.Choice(PROVIDERS),
    default="auto",
    show_default=True,
    help="onnxruntime execution provider.",
)
@click.option(
    "--mean",
    type=float,
    nargs=3,
    default=None,
    help="Normalisation mean per RGB channel [default: the dataset's].",
)
@click.option(
    "--std",
    type=float,
    nargs=3,
    default=None,
    help="Normalisation std per RGB channel [default: the dataset's].",
)
@click.option("--workers", type=int, help="Data loader processes [default: min(4, CPUs)].")
@click.option(
    "--download/--no-download",
    default=True,
    show_default=True,
    help="Download CIFAR when the data root does not hold it.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    help="Also write the result as JSON to this file.",
)
def eval_command(
    model: str,
    data_name: str,
    data_root: str | None,
    limit: int | None,
    seed: int,
    batch_size: int,
    provider: str,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
    workers: int | None,
    download: bool,
    json_path: str | None,
) -> None:
    """Measure the top-1 and top-5 accuracy of MODEL on a dataset's test images.

    \b
    Examples:
      sfp-onnx eval model.onnx --data cifar10 --data-root ./cifar10
      sfp-onnx eval model.slim.onnx --data imagefolder --data-root ./images --limit 1000
    """
    from sfp_onnx._io import check_writable, write_json
    from sfp_onnx.data.datasets import DataConfig, check_num_classes, load_datasets
    from sfp_onnx.runtime.evaluate import evaluate_onnx, read_signature

    if json_path:
        check_writable(json_path, inputs=(model,))
    signature = read_signature(model)
    config = DataConfig(
        name=data_name,
        root=data_root,
        mean=mean or None,
        std=std or None,
        eval_limit=limit,
        seed=seed,
        augment=False,
        download=download,
    )
    data = load_datasets(
        config, (signature.height, signature.width), channels=signature.channels, with_train=False
    )
    if signature.num_classes is not None:
        check_num_classes(signature.num_classes, data)
    with _progress_bar() as bar:
        task = bar.add_task("evaluating", total=len(data.test))
        accuracy = evaluate_onnx(
            model,
            data.test,
            batch_size=batch_size,
            provider=provider,
            workers=workers,
            num_classes=data.num_classes,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    _print_table(model, data_name, accuracy)
    if json_path:
        write_json(
            json_path,
            {
                "model": model,
                "data": data_name,
                "data_root": data_root,
                "limit": limit,
                "seed": seed,
                "input_size": list(signature.input_size),
                "classes": data.num_classes,
                "mean": list(data.mean),
                "std": list(data.std),
                "provider": provider,
                "samples": accuracy.samples,
                "top1": accuracy.top1,
                "top5": accuracy.top5,
            },
        )


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _print_table(model: str, data_name: str, accuracy) -> None:
    table = Table()
    for name, justify in (("Model", "left"), ("Data", "left"), ("Samples", "right")):
        table.add_column(name, justify=justify)
    table.add_column("Top-1", justify="right")
    table.add_column("Top-5", justify="right")
    table.add_row(
        Path(model).name,
        data_name,
        f"{accuracy.samples}",
        f"{accuracy.top1:.2%}",
        f"{accuracy.top5:.2%}",
    )
    Console().print(table)
