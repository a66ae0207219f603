"""Options shared by the commands: ``--round-to`` (a number, ``auto`` or ``none``), the data
set options of ``compress`` and ``plan --sensitivity``, and the sensitivity options."""

from __future__ import annotations

import click

__all__ = [
    "DATA_OPTIONS",
    "NUMBER_OR_AUTO",
    "ROUND_TO",
    "SENSITIVITY_OPTIONS",
    "RoundTo",
    "data_config",
    "option_group",
    "round_to_option",
]


class RoundTo(click.ParamType):
    """A positive integer, ``auto`` (kept as the string) or ``none`` (None: no rounding).

    ``auto`` is resolved by the library (:func:`sfp_onnx.runtime.target.resolve_round_to`), so the
    report records what it became on this machine.
    """

    name = "K|auto|none"

    def convert(self, value, param, ctx) -> int | str | None:
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text in ("auto", "none"):
            return None if text == "none" else "auto"
        if text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(f"{value!r} is not a positive integer, 'auto' or 'none'", param, ctx)


ROUND_TO = RoundTo()


class NumberOrAuto(click.ParamType):
    """A number >= 0, or ``auto`` (None: the library chooses, and the report says how)."""

    name = "W|auto"

    def convert(self, value, param, ctx) -> float | None:
        if value is None or isinstance(value, float):
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return None
        try:
            number = float(text)
        except ValueError:
            number = -1.0
        if number >= 0:
            return number
        self.fail(f"{value!r} is not a number >= 0 or 'auto'", param, ctx)


NUMBER_OR_AUTO = NumberOrAuto()


def round_to_option(help: str):
    """``--round-to K|auto|none`` (default auto) with the command's own ``help``."""
    return click.option(
        "--round-to", type=ROUND_TO, default="auto", show_default=True, metavar="K|auto|none",
        help=help,
    )  # fmt: skip


def option_group(*decorators):
    """One decorator applying ``decorators`` in the order they are listed."""

    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


DATA_OPTIONS = option_group(
    click.option("--data", "data_name", type=click.Choice(["cifar10", "cifar100", "imagefolder"]),
                 default="cifar10", show_default=True,
                 help="Data set. cifar10/cifar100 download through torchvision unless "
                 "--data-root holds them; imagefolder reads DATA_ROOT/train/<class>/* and "
                 "DATA_ROOT/test/<class>/* (or val/)."),
    click.option("--data-root", type=click.Path(),
                 help="Data set folder: an ImageFolder tree with train/ and test/, or "
                 "torchvision's CIFAR files. [default: download CIFAR to ~/.cache/sfp-onnx]"),
    click.option("--train-limit", type=click.IntRange(min=1),
                 help="Train on a seeded class-balanced subset of N images. [default: all]"),
    click.option("--eval-limit", type=click.IntRange(min=1),
                 help="Validate and test on seeded class-balanced subsets of N images. "
                 "[default: all]"),
    click.option("--val-split", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.1,
                 show_default=True,
                 help="Share of the training images set aside for per-epoch validation "
                 "(CIFAR-10: 5,000); the test set is measured before and after only. 0: none."),
    click.option("--mean", type=float, nargs=3, default=None, metavar="R G B",
                 help="Normalisation mean per channel. [default: the data set's preset]"),
    click.option("--std", type=float, nargs=3, default=None, metavar="R G B",
                 help="Normalisation std per channel. [default: the data set's preset]"),
    click.option("--augment/--no-augment", default=True, show_default=True,
                 help="Random crops and flips on the training images (printed at the start)."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Seeds the subsets, the shuffling, the augmentation and the weights' RNG."),
    click.option("--in-memory/--stream", "decode", default=True, show_default=True,
                 help="Decode a data set that fits (up to 4 GiB) once into memory and augment "
                      "it in batches, or read and transform the files every epoch."),
    click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
                 help="Data loader processes for data read from files (0: in-process)."),
)  # fmt: skip
SENSITIVITY_OPTIONS = option_group(
    click.option("--sensitivity/--no-sensitivity", default=None,
                 help="With a target: weigh each group by how much the loss rises when it alone "
                 "is cut (BatchNorm re-estimated, on held-back training images) instead of by "
                 "its filter norms. Costs a forward pass over --calibration-images (and 256 "
                 "more) per cut measured: about 2 minutes for a CIFAR ResNet-20 on 2 cores. "
                 "[default: on in compress with a target; off in plan, where it needs --data]"),
    click.option("--calibration-images", type=click.IntRange(min=1), default=512,
                 show_default=True,
                 help="--sensitivity: held-back images the loss is measured on."),
)  # fmt: skip


def data_config(opts: dict):
    """The :class:`~sfp_onnx.data.datasets.DataConfig` of the :data:`DATA_OPTIONS`."""
    from sfp_onnx.data.datasets import DataConfig

    return DataConfig(
        name=opts["data_name"], root=opts["data_root"], mean=opts["mean"], std=opts["std"],
        train_limit=opts["train_limit"], eval_limit=opts["eval_limit"],
        val_split=opts["val_split"], seed=opts["seed"], augment=opts["augment"],
        decode=opts["decode"],
    )  # fmt: skip
