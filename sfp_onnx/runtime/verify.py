"""Verification: does a rewritten model reproduce its reference, in onnxruntime?

This module owns the exactness check every model-writing command ends with. Both models run
in onnxruntime on the same inputs (seeded random tensors shaped like the graph inputs, or real
images); the check passes when every output of both is finite and the largest absolute
difference over all outputs is within ``tolerance × max|reference|`` (float32 round-off). A
NaN or an infinity never passes. It never writes anything.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sfp_onnx.errors import ExactnessError, UnsupportedModelError
from sfp_onnx.graph.load import EXTERNAL_DATA_THRESHOLD, save_model
from sfp_onnx.runtime.session import create_session

__all__ = ["DEFAULT_TOLERANCE", "Verification", "random_inputs", "verify_models"]

DEFAULT_TOLERANCE = 1e-4
# Models whose weights exceed this many bytes are handed to onnxruntime as files.
FILE_THRESHOLD = EXTERNAL_DATA_THRESHOLD

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass(frozen=True)
class Verification:
    """Outcome of comparing a candidate model with its reference."""

    max_abs_diff: float
    max_abs_reference: float
    inputs: str
    samples: int
    top1_agreement: float | None
    exact: bool
    finite: bool = True  # every output of both models was a finite number (NaN never passes)

    def to_json(self) -> dict:
        """The report's ``verification`` entry."""
        return asdict(self)


def _model_bytes(model: ir.Model | bytes | str) -> bytes | str:
    return (
        ir.serde.serialize_model(model).SerializeToString()
        if isinstance(model, ir.Model)
        else model
    )


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)


def _session(model: ir.Model | bytes | str, label: str):
    folder = None
    try:
        if isinstance(model, ir.Model) and _weight_bytes(model) > FILE_THRESHOLD:
            # Over protobuf's 2 GB limit a model cannot be passed as bytes: go through a file
            # with external data, which onnxruntime reads when the session is created.
            folder = Path(tempfile.mkdtemp(prefix="sfp-onnx-verify-"))
            model = str(save_model(model, folder / "model.onnx", external_data=True))
        return create_session(_model_bytes(model), provider="cpu")
    except Exception as exc:  # onnxruntime raises its own exception types, one per failure
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"onnxruntime cannot run {label}: {first}") from exc
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def random_inputs(session, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs for every graph input; symbolic dims become ``batch``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else batch for d in arg.shape]
        dtype = _NUMPY_TYPES.get(arg.type, np.float32)
        feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def verify_models(
    reference: ir.Model | bytes | str,
    candidate: ir.Model | bytes | str,
    *,
    feeds: Sequence[dict[str, np.ndarray]] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    description: str | None = None,
) -> Verification:
    """Run both models on the same inputs and compare every output.

    Args:
        reference: the model to reproduce (e.g. the masked model), as an IR model, bytes or path.
        candidate: the rewritten model.
        feeds: input batches; by default two seeded random batches.
        tolerance: relative tolerance on the largest absolute difference.
        seed: seed of the random inputs.
        description: what the inputs were, for the report (default: "random normal").
    """
    ref = _session(reference, "the reference model")
    cand = _session(candidate, "the rewritten model")
    if feeds is None:
        feeds = [random_inputs(ref, batch=b, seed=seed + b) for b in (1, 2)]
        description = description or "random normal"
    max_diff, max_ref, agree, total, finite = 0.0, 0.0, 0, 0, True
    for feed in feeds:
        outs_ref, outs_cand = ref.run(None, feed), cand.run(None, feed)
        for y_ref, y_cand in zip(outs_ref, outs_cand, strict=True):
            if y_ref.shape != y_cand.shape:
                raise ExactnessError(
                    f"output shapes differ: reference {y_ref.shape}, rewritten {y_cand.shape}"
                )
            if np.issubdtype(y_ref.dtype, np.floating):
                finite = finite and bool(np.isfinite(y_ref).all() and np.isfinite(y_cand).all())
            # a NaN would slip through max(): np.nanmax keeps it out, ``finite`` reports it
            max_diff = max(max_diff, float(np.nanmax(np.abs(y_ref - y_cand), initial=0.0)))
            max_ref = max(max_ref, float(np.nanmax(np.abs(y_ref), initial=0.0)))
        first_ref, first_cand = outs_ref[0], outs_cand[0]
        if first_ref.ndim == 2:
            agree += int((first_ref.argmax(1) == first_cand.argmax(1)).sum())
            total += first_ref.shape[0]
    exact = bool(finite and np.isfinite(max_diff) and max_diff <= tolerance * max(max_ref, 1e-30))
    return Verification(
        max_abs_diff=max_diff,
        max_abs_reference=max_ref,
        inputs=description or "given",
        samples=sum(next(iter(f.values())).shape[0] for f in feeds),
        top1_agreement=agree / total if total else None,
        exact=exact,
        finite=finite,
    )
