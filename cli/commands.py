"""The list of commands that ``sfp-onnx`` offers, one module each."""

from __future__ import annotations

import click
from sfp_onnx.cli.bench import bench
from sfp_onnx.cli.compress import compress
from sfp_onnx.cli.eval import eval_command
from sfp_onnx.cli.plan import plan
from sfp_onnx.cli.prune import analyze, prune, slim

__all__ = ["ALL"]

ALL: list[click.Command] = [analyze, plan, slim, prune, compress, eval_command, bench]
