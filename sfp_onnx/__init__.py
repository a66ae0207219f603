"""sfp-onnx: Soft Filter Pruning for ONNX image classifiers.

The public Python API. Each stage of the flow has its own module (load, analyze, soft-prune,
import, train, rewrite, verify, measure, ...); this file only re-exports what users call.
Names that need torch (``compress`` and its configs) are imported on first use, so the
ONNX-only commands start fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = [
    "Accuracy",
    "BenchConfig",
    "CompressOptions",
    "DataConfig",
    "SfpConfig",
    "TrainConfig",
    "__version__",
    "analyze",
    "benchmark",
    "compress",
    "evaluate_onnx",
    "measure_model",
    "prune",
    "slim",
]

_LAZY = {
    "compress": "sfp_onnx.pipeline",
    "CompressOptions": "sfp_onnx.pipeline",
    "DataConfig": "sfp_onnx.data",
    "SfpConfig": "sfp_onnx.sfp",
    "TrainConfig": "sfp_onnx.train",
    "Accuracy": "sfp_onnx.evaluate",
    "evaluate_onnx": "sfp_onnx.evaluate",
    "BenchConfig": "sfp_onnx.bench",
    "benchmark": "sfp_onnx.bench",
    "measure_model": "sfp_onnx.measure",
}


# Imported eagerly: the functions shadow the stage modules of the same name (sfp_onnx.analyze).
from sfp_onnx.api import analyze, prune, slim  # noqa: E402


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sfp_onnx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
