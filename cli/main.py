"""The ``sfp-onnx`` command group: registers the commands and turns errors into exit codes.

Each command lives in its own module of this package and only maps options to the library's
public API (``sfp_onnx``); no pruning logic lives here. A user-caused problem
(:class:`sfp_onnx.errors.SfpError`) is printed as one ``error:`` line with a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings

import click

from sfp_onnx._version import __version__
from sfp_onnx.errors import SfpError

__all__ = ["main"]


# Exit codes (the README lists them too).
EXIT_CODES = {
    0: "success",
    1: "an unexpected failure (a bug: please report it with the command line)",
    2: "a usage error, or an invalid input file",
    3: "a valid model sfp-onnx cannot handle",
    4: "a data set that is missing or does not fit the model",
    5: "a rewritten model that is not exact (nothing was written)",
    6: "an output that cannot be written",
    7: "training diverged (the last good checkpoint is kept)",
    130: "interrupted (Ctrl-C or SIGTERM; the last checkpoint is kept)",
}


class _Group(click.Group):
    """A click group whose every failure is one ``error:`` line and a documented exit code."""

    def main(self, args=None, prog_name=None, **extra):
        """Run the command; usage errors, SfpError and interrupts become one line each."""
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops cleanly, as Ctrl-C does
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _error(f"{exc.format_message()}{hint}")
            sys.exit(2)
        except click.ClickException as exc:
            _error(exc.format_message())
            sys.exit(exc.exit_code)
        except SfpError as exc:
            _error(str(exc))
            sys.exit(exc.exit_code)
        except (KeyboardInterrupt, click.Abort):
            _error("interrupted")
            sys.exit(130)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _error(message: str) -> None:
    """The one ``error:`` line; under torchrun only rank 0 says it (every rank exits with it)."""
    if int(os.environ.get("RANK", "0")) == 0:  # read here, not via torch: --help stays fast
        click.echo(f"error: {message}", err=True)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


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
    writes nothing if it is not exact. Errors are one line starting with "error:"; exit
    codes: 0 ok, 2 usage or input file, 3 unsupported model, 4 data, 5 not exact, 6 output,
    7 training diverged, 130 interrupted.
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
