"""sfp-onnx: Soft Filter Pruning for ONNX image classifiers.

The public Python API. Each stage of the flow has its own module (load, analyze, soft-prune,
rewrite, verify, measure, ...); this file only re-exports what users call.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "analyze", "prune", "slim"]

from sfp_onnx.api import analyze, prune, slim
