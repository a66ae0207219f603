"""The whole job: ONNX in, soft-pruning fine-tuning, a smaller exact ONNX out, measured.

This module owns the ``compress`` flow and only strings the stages together: load and
analyze the ONNX graph, open the data, measure the input's accuracy in onnxruntime, import
into torch (checked against onnxruntime), put norms back into a BN-folded export, fine-tune
with the pruner as a training hook (and the input model as the teacher), fold the norms back,
make the masks exact, write the trained weights into the graph, hand it to the exact surgery,
then measure the written file: accuracy, agreement with the torch model, MACs, parameters and
latency. Every stretch that takes a while is announced to ``options.progress``; what the run
was, in full, goes into the report (:mod:`sfp_onnx.run_record`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from sfp_onnx._io import write_json
from sfp_onnx.api import Outputs, write_pruned
from sfp_onnx.data.datasets import DataConfig, Datasets, check_num_classes, load_datasets
from sfp_onnx.data.loaders import create_loader
from sfp_onnx.errors import TrainingInterrupted, UnsupportedModelError, UsageError
from sfp_onnx.graph.analyze import analyze_model
from sfp_onnx.graph.groups import Analysis
from sfp_onnx.graph.load import load_model
from sfp_onnx.report import Report
from sfp_onnx.run_record import (
    describe_data,
    describe_distillation,
    describe_pruning,
    run_settings,
)
from sfp_onnx.runtime.evaluate import Accuracy, ImageModelSignature, evaluate_onnx, read_signature
from sfp_onnx.runtime.session import create_session
from sfp_onnx.runtime.target import resolve_round_to
from sfp_onnx.training import distributed
from sfp_onnx.training.distributed import Ranks
from sfp_onnx.training.feature_match import FeatureMatch
from sfp_onnx.training.hooks import TrainingHook
from sfp_onnx.training.import_torch import ImportedModel, import_model, write_back
from sfp_onnx.training.norms import BatchNormRecalibration, InsertedNorms
from sfp_onnx.training.objectives import Distillation, DistillConfig, resolve_features
from sfp_onnx.training.sfp import PaperSfpPruner, SfpConfig, recalibration_batches
from sfp_onnx.training.soft_masks import SoftMaskPruner
from sfp_onnx.training.train import (
    ProgressEvent,
    TrainConfig,
    TrainResult,
    resolve_device,
    steps_per_epoch,
    train,
)

__all__ = ["CompressOptions", "compress"]

PathLike = str | os.PathLike
Emit = Callable[[ProgressEvent], None]
# Real test images used for the exactness checks (torch vs onnxruntime, slim vs masked).
CHECK_IMAGES = 64
# Training batches that measure the conv outputs a norm inserted into a BN-folded export sees.
NORM_CALIBRATION_BATCHES = 20


@dataclass(frozen=True)
class CompressOptions:
    """Where ``compress`` keeps its work, what else it writes, and how it measures latency."""

    # checkpoints and metrics.csv; default: <output>.work/ beside the output, removed once the
    # output is written
    workdir: Path | None = None
    resume: bool = False  # continue the run saved in workdir
    save_masked: PathLike | None = None  # also write the zeroed, unsliced model
    report: PathLike | None = None  # also write the report JSON
    report_dir: PathLike | None = None  # report.json and PNG plots into this folder
    bench: bool = True  # measure onnxruntime latency before/after, as `sfp-onnx bench` does
    bench_batch: int = 1  # batch of the latency measurement
    bench_runs: int = 50  # timed runs per model, interleaved (after 10 warm-up runs)
    provider: str = "auto"  # onnxruntime provider of the latency measurement
    external_data: bool | None = None  # weights in <output>.data; None: only above 1.8 GB
    command_line: str | None = None  # how the run was started, recorded in the report
    progress: Callable[[ProgressEvent], None] | None = field(default=None, compare=False)


@dataclass
class _Job:
    """What the stages of one ``compress`` run hand each other."""

    model: PathLike
    masked: ir.Model
    analysis: Analysis
    imported: ImportedModel
    signature: ImageModelSignature
    datasets: Datasets
    check_feeds: list[dict]
    before: Accuracy | None  # None on the ranks after the first of a distributed run
    emit: Emit
    timing: dict = field(default_factory=dict)
    feature_rule: str = "given"  # how the feature-distillation weight was chosen


def compress(
    model: PathLike,
    output: PathLike,
    *,
    sfp: SfpConfig,
    data: DataConfig,
    training: TrainConfig | None = None,
    distill: DistillConfig | None = None,
    options: CompressOptions | None = None,
) -> Report | None:
    """Fine-tune ``model`` while soft-pruning it on ``data`` and write the slim model.

    Under ``torchrun`` every process calls this: they train together (DDP, one process per
    GPU, or gloo on the CPU) and rank 0 alone measures, writes and returns the report; the
    other ranks return None once training is done.

    Args:
        model: the input ONNX classifier (only read).
        output: where the slim ONNX goes.
        sfp: the rate and how to reach it (method, schedule, criterion, rounding).
        data: the dataset to fine-tune, validate and test on.
        training: the optimizer and its schedule (default :class:`TrainConfig`).
        distill: distillation from ``model`` (default: on, :class:`DistillConfig`).
        options: work folder, resume, extra outputs, latency.

    Returns:
        The report: MACs, parameters, file size, accuracy and latency before and after, the
        exactness check on real images, the training history and the resolved settings
        (None on the ranks after the first of a distributed run).
    """
    training = training or TrainConfig()
    with distributed.process_group(training.device) as ranks:
        return _compress(model, output, sfp, data, training, distill, options, ranks)


def _compress(
    model: PathLike, output: PathLike, sfp: SfpConfig, data: DataConfig, training: TrainConfig,
    distill: DistillConfig | None, options: CompressOptions | None, ranks: Ranks,
) -> Report | None:  # fmt: skip
    started = time.perf_counter()
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
    emit = (options.progress or _ignore) if ranks.is_main else _ignore  # rank 0 reports
    job = _prepare(model, sfp, data, training, emit)
    distill, job.feature_rule = _resolve_features(job, sfp, training, distill)
    history = _fine_tune(job, sfp, data, training, distill, workdir, options.resume)
    if not ranks.is_main:
        return None
    with _interrupt_after_training(workdir, output):
        result = _write(job, output, outputs, sfp, training, distill)
        result = _measure(job, result, output, options)
    settings = run_settings(
        model=model, output=output, sfp=sfp, data=data, training=training, distill=distill,
        options=options, workdir=workdir, device=history.device, feature_rule=job.feature_rule,
    )  # fmt: skip
    job.timing["total"] = time.perf_counter() - started
    extra = _extra(job, result, history, workdir, options)
    result = replace(result, settings=settings, extra=extra)
    _write_reports(result, options)
    if options.workdir is None:  # the default one only served this run, which is done
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _prepare(
    model: PathLike, sfp: SfpConfig, data: DataConfig, training: TrainConfig, emit: Emit
) -> _Job:
    """Load, analyze and import the model, open the data, measure where it starts."""
    started = time.perf_counter()
    emit(ProgressEvent("stage", message=f"reading and analysing {model}"))
    masked = load_model(model)
    analysis = analyze_model(masked)
    emit(ProgressEvent("stage", message="importing into PyTorch"))
    imported = import_model(masked)  # fails fast, naming every op that cannot be imported
    signature = read_signature(model)
    emit(ProgressEvent("stage", message=f"opening {data.name}"))
    with distributed.main_first():  # rank 0 fills the decoded-images cache the others read
        datasets = load_datasets(data, signature.input_size[1:], channels=signature.input_size[0])
    check_num_classes(signature.num_classes, datasets)
    emit(ProgressEvent("note", message=describe_data(data, datasets)))
    emit(ProgressEvent("note", message=describe_pruning(sfp, analysis)))
    check_feeds = _feeds(
        signature.input_name, _real_batch(datasets.test, training.seed, signature.batch),
        signature.batch,
    )  # fmt: skip
    emit(ProgressEvent("stage", message=f"checking the import on {CHECK_IMAGES} test images"))
    _check_import(imported, model, check_feeds)
    before = None  # measured and reported by rank 0 alone
    if distributed.current().is_main:
        before = _evaluate(model, datasets, emit, "the starting accuracy")
        message = f"starting accuracy: {_accuracy(before)} (onnxruntime)"
        emit(ProgressEvent("note", message=message))
    job = _Job(model, masked, analysis, imported, signature, datasets, check_feeds, before, emit)
    job.timing["prepare"] = time.perf_counter() - started
    return job


def _fine_tune(
    job: _Job, sfp: SfpConfig, data: DataConfig, training: TrainConfig,
    distill: DistillConfig, workdir: Path, resume: bool,
) -> TrainResult:  # fmt: skip
    """Train with the pruner (and the teacher), then make the masks exact in the weights."""
    started = time.perf_counter()
    train_set = job.datasets.train
    norms = _insert_norms(job, training)
    pruner = _pruner(job, sfp, norms)
    teacher = _teacher(job.model, distill, job.signature)
    job.emit(ProgressEvent("note", message=describe_distillation(distill, sfp, job.feature_rule)))
    objective = _objective(job, pruner, teacher, distill)
    features = [objective.features] if objective and objective.features else []
    history = train(
        job.imported.module, train_set, job.datasets.val, training,
        workdir=workdir, resume=resume,
        hooks=[pruner, *features, *_recalibration(job.imported, train_set, training, sfp)],
        objective=objective,
        on_progress=job.emit,
        settings=_resume_settings(job.model, sfp, data, distill),
    )  # fmt: skip
    for hook in features:
        hook.remove()  # the student's recorders: nothing reads them after the last step
    if not distributed.current().is_main:
        return history
    job.imported.module.to("cpu").eval()
    if norms is not None:
        norms.fold()
    pruner.finish()  # after the fold: a folded-back norm must not revive a zeroed channel
    job.timing["training"] = time.perf_counter() - started
    return history


@contextlib.contextmanager
def _interrupt_after_training(workdir: Path, output: PathLike):
    """Ctrl-C or SIGTERM once training is done: say what is saved and how to finish."""
    try:
        yield
    except KeyboardInterrupt:
        written = f"{output} was written but not measured; " if Path(output).exists() else ""
        raise TrainingInterrupted(
            f"interrupted after training; {written}the trained run is saved in {workdir}: "
            "run the same command with --resume to write and measure it without retraining"
        ) from None


def _write(
    job: _Job, output: PathLike, outputs: Outputs, sfp: SfpConfig, training: TrainConfig,
    distill: DistillConfig,
) -> Report:  # fmt: skip
    """Write the trained weights into the graph, remove the masked channels, verify, write."""
    started = time.perf_counter()
    job.emit(ProgressEvent("stage", message="removing the masked channels and checking exactness "
                           f"on {CHECK_IMAGES} real test images"))  # fmt: skip
    write_back(job.imported, job.masked)
    result = write_pruned(
        job.masked, job.analysis, source=job.model,
        outputs=replace(outputs, report=None),  # written below, with accuracy and latency
        command="compress", settings=_provenance(sfp, training, distill),
        verify_feeds=job.check_feeds, verify_description="real test",
    )  # fmt: skip
    job.timing["surgery_and_verification"] = time.perf_counter() - started
    return result


def _measure(job: _Job, result: Report, output: PathLike, options: CompressOptions) -> Report:
    """Accuracy of the written file, and its latency against the input's."""
    started = time.perf_counter()
    after = _evaluate(output, job.datasets, job.emit, "the final accuracy")
    job.timing["evaluation"] = time.perf_counter() - started
    extra = {"after": after}
    if options.bench:
        started = time.perf_counter()
        extra["latency"] = _latency(job.model, output, options, job.emit)
        job.timing["latency"] = time.perf_counter() - started
    return replace(result, extra=extra)


def _extra(job: _Job, result: Report, history: TrainResult, workdir: Path, options) -> dict:
    """The report's compress-only entries."""
    after: Accuracy = result.extra["after"]
    extra = {
        "accuracy": {"before": job.before.top1, "after": after.top1},
        "accuracy_top5": {"before": job.before.top5, "after": after.top5},
        "eval_samples": after.samples,
        "torch_agreement": _torch_agreement(job.imported, result.output, job.check_feeds),
        "training": {
            "epochs": [asdict(e) for e in history.epochs],
            "seconds": history.seconds,
            "device": history.device,
            "processes": history.processes,
            "backend": history.backend,
            "resumed_from": history.resumed_from,
            "workdir": str(workdir) if options.workdir is not None else None,
        },
        "timing_s": job.timing,
    }
    if "latency" in result.extra:
        extra["latency_ms"] = result.extra["latency"]
    return extra


def _write_reports(result: Report, options: CompressOptions) -> None:
    if options.report is not None:
        write_json(options.report, result.to_json())
    if options.report_dir is not None:
        from sfp_onnx.plots import write_report_dir

        write_report_dir(result, options.report_dir)


def _evaluate(model: PathLike, datasets: Datasets, emit: Emit, what: str) -> Accuracy:
    emit(ProgressEvent("stage", message=f"measuring {what} on {len(datasets.test)} test images"))

    def progress(done: int, total: int) -> None:
        emit(ProgressEvent("eval", 0, done, total))

    return evaluate_onnx(model, datasets.test, num_classes=datasets.num_classes, progress=progress)


def _accuracy(accuracy: Accuracy) -> str:
    return f"top-1 {accuracy.top1:.2%}, top-5 {accuracy.top5:.2%} on {accuracy.samples} images"


def _ignore(_event: ProgressEvent) -> None:
    pass


def _teacher(
    model: PathLike, distill: DistillConfig, signature: ImageModelSignature
) -> torch.nn.Module | None:
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


def _resolve_features(
    job: _Job, sfp: SfpConfig, training: TrainConfig, distill: DistillConfig
) -> tuple[DistillConfig, str]:
    """The feature-distillation weight of this run (``auto``: by its optimizer steps)."""
    steps = steps_per_epoch(len(job.datasets.train), training.batch_size) * training.epochs
    unmatched = None
    if sfp.method == "sfp-paper":
        unmatched = "the paper's method has no masks to match through"
    elif sfp.rate == 0 and sfp.plan is None:
        unmatched = "nothing is pruned"
    return resolve_features(distill, steps, unmatched=unmatched)


def _objective(
    job: _Job, pruner: SoftMaskPruner | PaperSfpPruner, teacher: torch.nn.Module | None,
    distill: DistillConfig,
) -> Distillation | None:  # fmt: skip
    """Distillation from ``teacher``, matching the kept channels where the masks allow it."""
    if teacher is None:
        return None
    if distill.feature_weight <= 0 or not isinstance(pruner, SoftMaskPruner):
        return Distillation(teacher, distill)  # the paper's zeroing has no gates to match at
    features = FeatureMatch(job.imported.module, teacher, pruner.gates, distill.features_decay)
    return Distillation(teacher, distill, features)


def _pruner(
    job: _Job, sfp: SfpConfig, norms: InsertedNorms | None
) -> SoftMaskPruner | PaperSfpPruner:
    if sfp.method == "sfp-paper":
        return PaperSfpPruner(job.imported, list(job.analysis.groups), sfp)
    view = norms.view if norms else None
    return SoftMaskPruner(job.imported, job.masked, job.analysis, sfp, view=view)


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


def _insert_norms(job: _Job, training: TrainConfig) -> InsertedNorms | None:
    """Norms after the un-normed convs of a BN-folded export (``training.insert_norms``)."""
    if not training.insert_norms:
        return None
    norms = InsertedNorms(job.imported, job.masked)
    if not norms:
        return None
    job.emit(ProgressEvent("note", message=f"BN-folded export: training with a BatchNorm after "
                           f"{len(norms)} convolutions, folded back before writing"))  # fmt: skip
    loader = create_loader(
        job.datasets.train, training.batch_size, shuffle=True, seed=training.seed * 7919,
        workers=training.workers,
    )  # fmt: skip
    norms.calibrate(loader, NORM_CALIBRATION_BATCHES)
    return norms


def _resume_settings(
    model: PathLike, sfp: SfpConfig, data: DataConfig, distill: DistillConfig
) -> dict:
    """What must match for ``--resume`` to continue a run."""
    return {"model": str(Path(model).resolve()), **asdict(sfp), "data": data.name,
            "train_limit": data.train_limit, "val_split": data.val_split, "seed": data.seed,
            "distill": asdict(distill)}  # fmt: skip


def _provenance(sfp: SfpConfig, training: TrainConfig, distill: DistillConfig) -> dict:
    """The settings recorded in the written model's metadata."""
    return {
        **asdict(sfp),
        "epochs": training.epochs,
        "distill": distill.enabled,
        "distill_weight": distill.weight,
        "distill_temperature": distill.temperature,
        "distill_features": distill.feature_weight,
        "distill_features_decay": distill.features_decay,
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
    if not diff <= 1e-4 * max(float(np.abs(reference).max()), 1e-12):  # NaN fails too
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


def _latency(model: PathLike, output: PathLike, options: CompressOptions, emit: Emit) -> dict:
    """p50 latency of both files, measured as ``sfp-onnx bench`` does (interleaved runs)."""
    from sfp_onnx.runtime.bench import BenchConfig, benchmark

    config = BenchConfig(
        batch_sizes=(options.bench_batch,), warmup=10, runs=options.bench_runs,
        provider=options.provider,
    )  # fmt: skip
    emit(ProgressEvent("stage", message=f"measuring latency: {config.runs} interleaved runs "
                       f"per model at batch {options.bench_batch}"))  # fmt: skip

    def progress(done: int, total: int) -> None:
        emit(ProgressEvent("eval", 0, done, total))

    report = benchmark([model, output], config, progress=progress)
    before, after = report.results[0], report.results[1]
    return {
        "before": before.latency_ms["p50"],
        "after": after.latency_ms["p50"],
        "batch_size": before.batch_size,
        "runs": config.runs,
        "provider": before.provider,
    }
