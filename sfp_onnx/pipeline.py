"""The whole job: ONNX in, soft-pruning fine-tuning, a smaller exact ONNX out, measured.

This module owns the ``compress`` flow and only strings the stages together: load and
analyze the ONNX graph, open the data, measure the input's accuracy in onnxruntime, import
into torch (checked against onnxruntime), put norms back into a BN-folded export, fine-tune
with the pruner as a training hook (and the input model as the teacher), fold the norms back,
make the masks exact, write the trained weights into the graph, hand it to the exact surgery,
then measure the written file: accuracy, agreement with the torch model, MACs, parameters and
latency.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from sfp_onnx._io import write_json
from sfp_onnx.api import Outputs, write_pruned
from sfp_onnx.data.datasets import DataConfig, check_num_classes, create_loader, load_datasets
from sfp_onnx.errors import UnsupportedModelError, UsageError
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.groups import Analysis
from sfp_onnx.graph.load import load_model
from sfp_onnx.report import Report
from sfp_onnx.runtime.evaluate import evaluate_onnx, read_signature
from sfp_onnx.runtime.session import create_session
from sfp_onnx.runtime.target import resolve_round_to
from sfp_onnx.training.hooks import TrainingHook
from sfp_onnx.training.import_torch import ImportedModel, import_model, write_back
from sfp_onnx.training.norms import BatchNormRecalibration, InsertedNorms
from sfp_onnx.training.objectives import Distillation, DistillConfig
from sfp_onnx.training.sfp import PaperSfpPruner, SfpConfig, recalibration_batches
from sfp_onnx.training.soft_masks import SoftMaskPruner
from sfp_onnx.training.train import TrainConfig, resolve_device, train

__all__ = ["CompressOptions", "compress"]

PathLike = str | os.PathLike
# Real test images used for the exactness checks (torch vs onnxruntime, slim vs masked).
CHECK_IMAGES = 64
# Training batches that measure the conv outputs a norm inserted into a BN-folded export sees.
NORM_CALIBRATION_BATCHES = 20


@dataclass(frozen=True)
class CompressOptions:
    """Where ``compress`` keeps its work and what else it writes."""

    # checkpoints; default: <output>.work/ beside the output, removed once the output is written
    workdir: Path | None = None
    resume: bool = False  # continue the run saved in workdir
    save_masked: PathLike | None = None  # also write the zeroed, unsliced model
    report: PathLike | None = None  # also write the report JSON
    bench: bool = True  # measure onnxruntime latency before/after
    external_data: bool | None = None  # weights in <output>.data; None: only above 1.8 GB
    progress: Callable[[object], None] | None = field(default=None, compare=False)


def compress(
    model: PathLike,
    output: PathLike,
    *,
    sfp: SfpConfig,
    data: DataConfig,
    training: TrainConfig | None = None,
    distill: DistillConfig | None = None,
    options: CompressOptions | None = None,
) -> Report:
    """Fine-tune ``model`` while soft-pruning it on ``data`` and write the slim model.

    Args:
        model: the input ONNX classifier (only read).
        output: where the slim ONNX goes.
        sfp: the rate and how to reach it (method, schedule, criterion, rounding).
        data: the dataset to fine-tune and evaluate on.
        training: the optimizer and its schedule (default :class:`TrainConfig`).
        distill: distillation from ``model`` (default: on, :class:`DistillConfig`).
        options: work folder, resume, extra outputs, latency.

    Returns:
        The report: MACs, parameters, file size, accuracy and latency before and after, the
        exactness check on real images, and the training history.
    """
    training = training or TrainConfig()
    distill = distill or DistillConfig()
    options = options or CompressOptions()
    if isinstance(sfp.round_to, str):
        target = "cuda" if resolve_device(training.device).type == "cuda" else "cpu"
        sfp = replace(sfp, round_to=resolve_round_to(sfp.round_to, target))
    outputs = Outputs(
        output, report=options.report, masked=options.save_masked,
        external_data=options.external_data,
    )  # fmt: skip
    outputs.check(model)
    workdir = Path(options.workdir or f"{output}.work")

    masked = load_model(model)
    analysis = analyze_model(masked)
    imported = import_model(masked)  # fails fast, naming every op that cannot be imported
    signature = read_signature(model)
    datasets = load_datasets(data, signature.input_size[1:], channels=signature.input_size[0])
    check_num_classes(signature.num_classes, datasets)
    before = evaluate_onnx(model, datasets.test, num_classes=datasets.num_classes)
    check_images = _real_batch(datasets.test, training.seed, signature.batch)
    check_feeds = _feeds(signature.input_name, check_images, signature.batch)
    _check_import(imported, model, check_feeds)

    norms = _insert_norms(imported, masked, datasets.train, training)
    pruner = _pruner(imported, masked, analysis, sfp, norms)
    teacher = _teacher(model, distill, signature)
    history = train(
        imported.module, datasets.train, datasets.test, training,
        workdir=workdir, resume=options.resume,
        hooks=[pruner, *_recalibration(imported, datasets.train, training, sfp)],
        objective=Distillation(teacher, distill) if teacher is not None else None,
        on_progress=options.progress,
        settings=_settings(model, sfp, data, distill),
    )  # fmt: skip
    imported.module.to("cpu").eval()
    if norms is not None:
        norms.fold()
    if isinstance(pruner, SoftMaskPruner):
        pruner.finish()
    write_back(imported, masked)
    result = write_pruned(
        masked, analysis, source=model,
        outputs=replace(outputs, report=None),  # written below, with accuracy and latency
        command="compress", settings=_provenance(sfp, training, distill, norms),
        verify_feeds=check_feeds, verify_description=f"real {data.name} test",
    )  # fmt: skip
    after = evaluate_onnx(output, datasets.test, num_classes=datasets.num_classes)
    extra = {
        "accuracy": {"before": before.top1, "after": after.top1},
        "accuracy_top5": {"before": before.top5, "after": after.top5},
        "eval_samples": after.samples,
        "torch_agreement": _torch_agreement(imported, output, check_feeds),
        "training": {
            "epochs": [asdict(e) for e in history.epochs],
            "seconds": history.seconds,
            "device": history.device,
            "resumed_from": history.resumed_from,
            "workdir": str(workdir) if options.workdir is not None else None,
        },
    }
    if options.bench:
        extra["latency_ms"] = _latency(model, output)
    result = replace(result, extra=extra)
    if options.report is not None:
        write_json(options.report, result.to_json())
    if options.workdir is None:  # the default one only served this run, which is done
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _teacher(model: PathLike, distill: DistillConfig, signature) -> torch.nn.Module | None:
    """The frozen teacher: the input model (or ``distill.teacher``) imported once more."""
    if not distill.enabled:
        return None
    source = distill.teacher or model
    theirs = read_signature(source)
    if (theirs.input_size, theirs.num_classes) != (signature.input_size, signature.num_classes):
        raise UsageError(
            f"the teacher {source} takes other images or gives other classes than {model}; "
            "give a teacher with the same input size and classes"
        )
    return import_model(load_model(source)).module


def _pruner(
    imported: ImportedModel, model, analysis: Analysis, sfp: SfpConfig, norms: InsertedNorms | None
) -> TrainingHook:
    if sfp.method == "sfp-paper":
        return PaperSfpPruner(imported, list(analysis.groups), sfp)
    return SoftMaskPruner(imported, model, analysis, sfp, view=norms.view if norms else None)


def _recalibration(
    imported: ImportedModel, train_set, training: TrainConfig, sfp: SfpConfig
) -> list[TrainingHook]:
    """BatchNorm re-estimation after each epoch's masks, when asked for."""
    batches = recalibration_batches(sfp)
    if not batches:
        return []
    return [
        BatchNormRecalibration(
            imported.module, train_set, training.batch_size, training.seed, batches,
            workers=training.workers,
        )
    ]  # fmt: skip


def _insert_norms(
    imported: ImportedModel, model, train_set, training: TrainConfig
) -> InsertedNorms | None:
    """Norms after the un-normed convs of a BN-folded export (``training.insert_norms``)."""
    if not training.insert_norms:
        return None
    norms = InsertedNorms(imported, model)
    if not norms:
        return None
    loader = create_loader(
        train_set, training.batch_size, shuffle=True, seed=training.seed * 7919,
        workers=training.workers,
    )  # fmt: skip
    norms.calibrate(loader, NORM_CALIBRATION_BATCHES)
    return norms


def _settings(model: PathLike, sfp: SfpConfig, data: DataConfig, distill: DistillConfig) -> dict:
    """What must match for ``--resume`` to continue a run."""
    return {"model": str(Path(model).resolve()), **asdict(sfp), "data": data.name,
            "train_limit": data.train_limit, "seed": data.seed,
            "distill": asdict(distill)}  # fmt: skip


def _provenance(
    sfp: SfpConfig, training: TrainConfig, distill: DistillConfig, norms: InsertedNorms | None
) -> dict:
    """The settings recorded in the written model's metadata and the report."""
    return {
        **asdict(sfp),
        "epochs": training.epochs,
        "distill": distill.enabled,
        "distill_weight": distill.weight,
        "distill_temperature": distill.temperature,
        "inserted_norms": len(norms.attached) if norms else 0,
    }


def _real_batch(dataset, seed: int, fixed_batch: int | None) -> np.ndarray:
    """``CHECK_IMAGES`` real images, rounded up to whole runs of a fixed-batch model."""
    count = CHECK_IMAGES if fixed_batch is None else -(-CHECK_IMAGES // fixed_batch) * fixed_batch
    loader = create_loader(dataset, batch_size=count, shuffle=False, seed=seed, workers=0)
    images, _ = next(iter(loader))
    return images.numpy().astype(np.float32)


def _feeds(input_name: str, images: np.ndarray, fixed_batch: int | None) -> list[dict]:
    """The images as onnxruntime feeds: one run, or runs of the model's fixed batch."""
    step = fixed_batch or len(images)
    return [{input_name: images[s : s + step]} for s in range(0, len(images) - step + 1, step)]


def _run_onnx(model: PathLike, feeds: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(images, first output) of ``model`` in onnxruntime over all feeds."""
    session = create_session(model, provider="cpu")
    outputs = [session.run(None, feed)[0] for feed in feeds]
    images = [next(iter(feed.values())) for feed in feeds]
    return np.concatenate(images), np.concatenate(outputs)


def _torch_outputs(imported: ImportedModel, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return imported.module.eval()(torch.from_numpy(images)).numpy()


def _check_import(imported: ImportedModel, model: PathLike, feeds: list[dict]) -> None:
    images, reference = _run_onnx(model, feeds)
    ours = _torch_outputs(imported, images)
    diff = float(np.abs(ours - reference).max())
    if diff > 1e-4 * max(float(np.abs(reference).max()), 1e-12):
        raise UnsupportedModelError(
            f"the model imported into PyTorch differs from onnxruntime by {diff:.3g} on real "
            "images; it cannot be fine-tuned faithfully"
        )


def _torch_agreement(imported: ImportedModel, output: PathLike, feeds: list[dict]) -> dict:
    """The slim file in onnxruntime against the trained, masked torch model."""
    images, slim = _run_onnx(output, feeds)
    ours = _torch_outputs(imported, images)
    return {
        "max_abs_diff": float(np.abs(ours - slim).max()),
        "max_abs_reference": float(np.abs(ours).max()),
        "top1_agreement": float((ours.argmax(1) == slim.argmax(1)).mean()),
        "images": int(images.shape[0]),
    }


def _latency(model: PathLike, output: PathLike) -> dict:
    from sfp_onnx.runtime.bench import BenchConfig, benchmark

    report = benchmark([model, output], BenchConfig(batch_sizes=(1,), warmup=5, runs=30))
    before, after = report.results[0], report.results[1]
    return {"before": before.latency_ms["p50"], "after": after.latency_ms["p50"], "batch_size": 1}
