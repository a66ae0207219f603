"""The list of commands that ``sfp-onnx`` offers, one module each."""

from __future__ import annotations

import click

__all__ = ["ALL"]

ALL: list[click.Command] = []
