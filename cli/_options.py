"""Options shared by the commands: ``--round-to`` takes a number, ``auto`` or ``none``."""

from __future__ import annotations

import click

__all__ = ["ROUND_TO", "RoundTo", "round_to_option"]


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


def round_to_option(help: str):
    """``--round-to K|auto|none`` (default auto) with the command's own ``help``."""
    return click.option(
        "--round-to", type=ROUND_TO, default="auto", show_default=True, metavar="K|auto|none",
        help=help,
    )  # fmt: skip
