"""The ``sfp-onnx`` command group: registers the commands and turns errors into exit codes.

Each command lives in its own module of this package and only maps options to the library's
public API (``sfp_onnx``); no pruning logic lives here. A user-caused problem
(:class:`sfp_onnx.errors.SfpError`) is printed as one ``error:`` line with a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import sys
import warnings

import click

from sfp_onnx._version import __version__
from sfp_onnx.errors import SfpError

__all__ = ["main"]


class _Group(click.Group):
    """A click group that reports :class:`SfpError` as one line and a non-zero exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SfpError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sfp-onnx")
def main() -> None:
    """Make an ONNX image classifier smaller and faster with Soft Filter Pruning.

    \b
    Typical use:
      sfp-onnx analyze model.onnx                    # what can be pruned, MACs per layer
      sfp-onnx prune model.onnx --rate 0.3 -o s.onnx # one-shot prune, no training
      sfp-onnx compress model.onnx --rate 0.3 --data cifar10 -o s.onnx
      sfp-onnx bench model.onnx s.onnx               # latency before/after

    Every command that writes a model checks it against its reference in onnxruntime and
    writes nothing if it is not exact.
    """
    # onnx2torch's Slice converter indexes with a list, which torch deprecates; the values are
    # right, and a user can do nothing about the warning.
    warnings.filterwarnings(
        "ignore", message="Using a non-tuple sequence for multidimensional indexing"
    )


def _register() -> None:
    from sfp_onnx.cli import commands

    for command in commands.ALL:
        main.add_command(command)


_register()


if __name__ == "__main__":
    main()
