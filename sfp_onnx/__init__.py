"""sfp-onnx: Soft Filter Pruning for ONNX image classifiers.

The public Python API. The library is organised by stage: :mod:`sfp_onnx.graph` (the ONNX
side: load, analyze, score, rewrite, measure), :mod:`sfp_onnx.training` (the torch side:
import, soft pruning, the training loop), :mod:`sfp_onnx.runtime` (onnxruntime: verify,
evaluate, bench) and :mod:`sfp_onnx.data`; :mod:`sfp_onnx.api` and :mod:`sfp_onnx.pipeline`
string them into the commands. This file only re-exports what users call, each name imported
on first use, so ``import sfp_onnx`` is cheap and the ONNX-only commands never import torch.
"""

from __future__ import annotations

import importlib

from sfp_onnx._version import __version__

__all__ = [
    "Accuracy",
    "BenchConfig",
    "CompressOptions",
    "DataConfig",
    "Plan",
    "SensitivityConfig",
    "SfpConfig",
    "TrainConfig",
    "__version__",
    "analyze",
    "benchmark",
    "compress",
    "evaluate_onnx",
    "make_plan",
    "measure_model",
    "measure_plan_sensitivity",
    "prune",
    "read_plan",
    "slim",
]

_LAZY = {
    "analyze": "sfp_onnx.api",
    "prune": "sfp_onnx.api",
    "slim": "sfp_onnx.api",
    "compress": "sfp_onnx.pipeline",
    "CompressOptions": "sfp_onnx.pipeline",
    "DataConfig": "sfp_onnx.data.datasets",
    "SfpConfig": "sfp_onnx.training.sfp",
    "TrainConfig": "sfp_onnx.training.train",
    "Accuracy": "sfp_onnx.runtime.evaluate",
    "evaluate_onnx": "sfp_onnx.runtime.evaluate",
    "BenchConfig": "sfp_onnx.runtime.bench",
    "benchmark": "sfp_onnx.runtime.bench",
    "measure_model": "sfp_onnx.graph.measure",
    "make_plan": "sfp_onnx.planning",
    "read_plan": "sfp_onnx.planning",
    "Plan": "sfp_onnx.planning",
    "measure_plan_sensitivity": "sfp_onnx.planning",
    "SensitivityConfig": "sfp_onnx.training.sensitivity",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sfp_onnx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
