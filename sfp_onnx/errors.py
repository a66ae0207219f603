"""User-facing errors of sfp-onnx.

Every failure a user can cause (a bad file, a bad flag, data that does not fit the model, a
model that cannot be rewritten exactly) is raised as an :class:`SfpError` subclass whose
message is one complete line. The CLI prints that line and exits non-zero; the library never
prints or exits. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "ExactnessError",
    "InvalidModelError",
    "OutputError",
    "SfpError",
    "TrainingDiverged",
    "TrainingInterrupted",
    "UnsupportedModelError",
    "UsageError",
]


class SfpError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 1


class InvalidModelError(SfpError):
    """The input is missing, not ONNX, truncated, or fails the ONNX checker."""

    exit_code = 2


class UnsupportedModelError(SfpError):
    """A valid ONNX model that sfp-onnx cannot handle (quantized, no Conv, unknown opset...)."""

    exit_code = 3


class UsageError(SfpError):
    """An option value out of range or options that contradict each other."""

    exit_code = 2


class DataError(SfpError):
    """The dataset is missing, empty, or does not fit the model."""

    exit_code = 4


class ExactnessError(SfpError):
    """A rewritten model does not reproduce its reference; nothing was written."""

    exit_code = 5


class OutputError(SfpError):
    """An output path cannot be written (read-only directory, full disk, same as input)."""

    exit_code = 6


class TrainingDiverged(SfpError):
    """The loss or the weights went non-finite or exploded; the last good checkpoint is kept."""

    exit_code = 7


class TrainingInterrupted(SfpError):
    """Training stopped by Ctrl-C or SIGTERM; the last completed epoch's checkpoint is kept."""

    exit_code = 130
