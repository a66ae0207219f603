"""Evaluation: top-1/top-5 accuracy of an ONNX model (onnxruntime) or a torch module.

This module owns reading an image classifier's interface from its ONNX graph (one NCHW image
input, ``(batch, classes)`` logits out) and counting correct predictions. Both evaluators count
with the same function, so an ONNX model and the torch module it came from agree exactly when
their logits rank the classes the same way. Datasets and loaders come from
:mod:`sfp_onnx.data.datasets`; sessions from :func:`sfp_onnx.runtime.session.create_session`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.utils.data import Dataset

from sfp_onnx.data.loaders import create_loader
from sfp_onnx.errors import DataError, UnsupportedModelError, UsageError
from sfp_onnx.graph.load import read_model_proto
from sfp_onnx.runtime.session import create_session

__all__ = [
    "TOPK",
    "Accuracy",
    "ImageModelSignature",
    "evaluate_onnx",
    "evaluate_torch",
    "input_size_of",
    "read_signature",
]

TOPK = 5  # the "top-5" of Accuracy; models with fewer classes use k = number of classes
_FLOAT_INPUTS = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
}
_ORT_FLOAT_INPUTS = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}

Progress = Callable[[int, int], None]  # (samples done, samples in all)


@dataclass(frozen=True)
class Accuracy:
    """Classification accuracy over a dataset.

    Attributes:
        top1: fraction of samples whose label has the highest logit.
        top5: fraction whose label is among the ``min(5, classes)`` highest logits.
        samples: number of samples evaluated.
    """

    top1: float
    top5: float
    samples: int

    @classmethod
    def from_counts(cls, correct1: int, correct5: int, samples: int) -> Accuracy:
        """Build from counts of correct predictions."""
        if samples < 1:
            raise DataError("the dataset has no samples to evaluate; check the data root")
        return cls(top1=correct1 / samples, top5=correct5 / samples, samples=samples)


@dataclass(frozen=True)
class ImageModelSignature:
    """The interface of an image classifier, as its ONNX graph declares it.

    Attributes:
        input_name: name of the image input.
        batch: the fixed batch size, or ``None`` when the batch axis is dynamic.
        channels: input channels.
        height: input height.
        width: input width.
        num_classes: width of the ``(batch, classes)`` output, ``None`` when not declared.
    """

    input_name: str
    batch: int | None
    channels: int
    height: int
    width: int
    num_classes: int | None

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(channels, height, width)``."""
        return (self.channels, self.height, self.width)


def read_signature(model: str | os.PathLike | onnx.ModelProto) -> ImageModelSignature:
    """Read the image input and class count of a classifier from its ONNX graph.

    Raises:
        InvalidModelError: the file is missing or not ONNX.
        UnsupportedModelError: not exactly one float input of fixed shape ``(N, C, H, W)``.
    """
    proto = model if isinstance(model, onnx.ModelProto) else read_model_proto(model)
    name = "the model" if isinstance(model, onnx.ModelProto) else Path(model).name
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise UnsupportedModelError(
            f"{name} has {len(inputs)} inputs ({names}); sfp-onnx evaluates image "
            "classifiers with one NCHW image input"
        )
    image = inputs[0]
    tensor_type = image.type.tensor_type
    if tensor_type.elem_type not in _FLOAT_INPUTS:
        kind = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
        raise UnsupportedModelError(
            f"{name} takes a {kind} input {image.name!r}; sfp-onnx needs a float image input"
        )
    dims = _dims(image.type)
    _check_image_dims(name, image.name, dims)
    outputs = _dims(proto.graph.output[0].type) if proto.graph.output else []
    classes = outputs[1] if len(outputs) == 2 else None
    return ImageModelSignature(image.name, dims[0], dims[1], dims[2], dims[3], classes)


def input_size_of(model: str | os.PathLike | onnx.ModelProto) -> tuple[int, int, int]:
    """``(channels, height, width)`` of a classifier's image input (see :func:`read_signature`)."""
    return read_signature(model).input_size


def _dims(value_type: onnx.TypeProto) -> list[int | None]:
    shape = value_type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _check_image_dims(model_name: str, input_name: str, dims: list[int | None]) -> None:
    shown = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
    if len(dims) != 4:
        raise UnsupportedModelError(
            f"{model_name} input {input_name!r} has shape {shown}; sfp-onnx needs a 4-D "
            "NCHW image input (batch, channels, height, width)"
        )
    if dims[1] not in (1, 3) and dims[3] in (1, 3):
        raise UnsupportedModelError(
            f"{model_name} input {input_name!r} has shape {shown}, channels last (NHWC); "
            "sfp-onnx needs NCHW input: re-export the model channels first"
        )
    if None in dims[1:]:
        raise UnsupportedModelError(
            f"{model_name} input {input_name!r} has shape {shown} with dynamic channels or "
            "size; re-export the model with a fixed (C, H, W) input size"
        )


class _Counter:
    """Accumulates top-1 and top-k counts over batches of logits."""

    def __init__(self, num_classes: int | None) -> None:
        self.num_classes = num_classes
        self.correct1 = 0
        self.correctk = 0
        self.samples = 0

    def add(self, logits: np.ndarray, targets: np.ndarray) -> None:
        """Count one batch of ``(batch, classes)`` logits against integer targets."""
        _check_logits(logits, targets, self.num_classes)
        classes = logits.shape[1]
        target_logit = logits[np.arange(len(targets)), targets][:, None]
        order = np.arange(classes)[None, :]
        # Rank of the target: classes with a higher logit, ties broken by lower index
        # first (as argmax does). A NaN target logit is never correct.
        ahead = (logits > target_logit) | ((logits == target_logit) & (order < targets[:, None]))
        rank = np.where(np.isnan(target_logit[:, 0]), classes, ahead.sum(axis=1))
        self.correct1 += int((rank < 1).sum())
        self.correctk += int((rank < min(TOPK, classes)).sum())
        self.samples += len(targets)

    def result(self) -> Accuracy:
        """The accuracy over everything added."""
        return Accuracy.from_counts(self.correct1, self.correctk, self.samples)


def _check_logits(logits: np.ndarray, targets: np.ndarray, num_classes: int | None) -> None:
    if logits.ndim != 2 or logits.shape[0] != len(targets):
        raise UnsupportedModelError(
            f"the model's first output has shape {list(logits.shape)} for a batch of "
            f"{len(targets)}; sfp-onnx evaluates classifiers with (batch, classes) logits"
        )
    classes = logits.shape[1]
    if num_classes is not None and classes != num_classes:
        raise DataError(
            f"model has {classes} outputs but the dataset has {num_classes} classes; "
            "use a model trained for this dataset"
        )
    if len(targets) and int(targets.max()) >= classes:
        raise DataError(
            f"dataset label {int(targets.max())} is out of range for a model with "
            f"{classes} outputs; use a model trained for this dataset"
        )


def evaluate_onnx(
    model: str | os.PathLike,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    provider: str = "auto",
    progress: Progress | None = None,
    workers: int | None = None,
    num_classes: int | None = None,
) -> Accuracy:
    """Top-1/top-5 accuracy of an ONNX classifier in onnxruntime.

    A model with a fixed batch size (often 1) is run that many images at a time, padding the
    last batch; a dynamic-batch model gets ``batch_size`` images per run.

    Args:
        model: path of the ``.onnx`` file.
        dataset: yields ``(image tensor, label)`` pairs of the model's input size.
        batch_size: images loaded (and, for dynamic-batch models, run) at a time.
        provider: onnxruntime provider, see :func:`sfp_onnx.runtime.session.resolve_providers`.
        progress: called with ``(samples done, samples in all)`` after each batch.
        workers: loader processes, see :func:`sfp_onnx.data.loaders.create_loader`.
        num_classes: the dataset's class count; the model must have as many outputs.

    Raises:
        DataError: the model's outputs do not fit the dataset's classes.
        UnsupportedModelError: the model is not a ``(batch, classes)`` image classifier.
    """
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} is too small; give a value >= 1")
    session = create_session(model, provider=provider)
    image, logits = session.get_inputs()[0], session.get_outputs()[0]
    dtype = _ORT_FLOAT_INPUTS.get(image.type)
    if dtype is None:
        raise UnsupportedModelError(f"{Path(model).name} takes a {image.type} input, not float")
    fixed = image.shape[0] if isinstance(image.shape[0], int) and image.shape[0] > 0 else None

    def run(images: np.ndarray) -> np.ndarray:
        return session.run([logits.name], {image.name: images.astype(dtype, copy=False)})[0]

    loader = create_loader(dataset, batch_size, shuffle=False, seed=0, workers=workers)
    counter = _Counter(num_classes)
    for images, targets in loader:
        counter.add(_run_in_batches(run, images.numpy(), fixed), targets.numpy())
        if progress is not None:
            progress(counter.samples, len(dataset))
    return counter.result()


def _run_in_batches(
    run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, fixed: int | None
) -> np.ndarray:
    """Run ``images`` at once, or ``fixed`` at a time with the last chunk zero-padded."""
    if fixed is None or fixed == len(images):
        return run(images)
    outputs = []
    for start in range(0, len(images), fixed):
        chunk = images[start : start + fixed]
        padded = np.zeros((fixed, *images.shape[1:]), images.dtype)
        padded[: len(chunk)] = chunk
        outputs.append(run(padded)[: len(chunk)])
    return np.concatenate(outputs)


def evaluate_torch(
    module: torch.nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device,
    *,
    progress: Progress | None = None,
    num_classes: int | None = None,
) -> Accuracy:
    """Top-1/top-5 accuracy of a torch classifier, in eval mode and without gradients.

    The module's train/eval mode is restored afterwards.

    Args:
        module: maps a ``(batch, C, H, W)`` tensor to ``(batch, classes)`` logits.
        loader: yields ``(images, labels)`` batches.
        device: where to run the module (it must already be there).
        progress: called with ``(samples done, samples in all)`` after each batch.
        num_classes: the dataset's class count; the module must have as many outputs.
    """
    total = len(loader.dataset) if hasattr(loader, "dataset") else 0
    counter = _Counter(num_classes)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for images, targets in loader:
                logits = module(images.to(device, non_blocking=True))
                counter.add(logits.float().cpu().numpy(), targets.numpy())
                if progress is not None:
                    progress(counter.samples, total)
    finally:
        module.train(was_training)
    return counter.result()
