"""The import-coverage matrix: torchvision classifiers x exporters, and the check of one cell.

Shared by tests/test_import_coverage.py (which asserts on each cell) and
benchmarks/import_coverage.py (which tabulates them). A cell is one model exported one way
with the exporter's defaults: a fixed batch of 1, input ``input`` [1, 3, S, S], output
``logits``. The check loads and imports the file as ``compress`` does, compares torch with
onnxruntime on real CIFAR-10 images, and takes one SGD step at batch 4.
"""

from __future__ import annotations

import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from tests.exports import cifar_images, torchvision_model

MODELS = (
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
    "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s",
    "densenet121", "shufflenet_v2_x0_5", "squeezenet1_0", "vgg11_bn", "regnet_x_400mf",
    "regnet_y_400mf", "googlenet", "mnasnet0_5", "convnext_tiny",
)  # fmt: skip
# legacy TorchScript exporter: opset 13/17, BN kept (no constant folding) or folded; dynamo
VARIANTS = ("kept13", "fold13", "kept17", "fold17", "dynamo")
# The fast half: small models through the legacy exporter, and two dynamo exports.
FAST_MODELS = frozenset(
    {
        "resnet18", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
        "efficientnet_b0", "shufflenet_v2_x0_5", "squeezenet1_0", "vgg11_bn",
        "regnet_x_400mf", "regnet_y_400mf", "googlenet", "mnasnet0_5",
    }
)  # fmt: skip
FAST_DYNAMO = frozenset({"resnet18", "mnasnet0_5"})
TOLERANCE = 1e-5  # torch vs onnxruntime, relative to max |y|
BATCH = 4  # images per check and per training step


def is_fast(model: str, variant: str) -> bool:
    """Whether the cell belongs to the fast half CI always runs."""
    return model in (FAST_DYNAMO if variant == "dynamo" else FAST_MODELS)


def input_size(model: str) -> int:
    """32 px, except VGG (its narrowed classifier expects the 2x2 map of 64 px)."""
    return 64 if model.startswith("vgg") else 32


def export_default(model: str, variant: str, folder: Path) -> Path:
    """Export ``model`` once into ``folder`` with the exporter's defaults (fixed batch 1).

    ``variant`` is one of :data:`VARIANTS`, or ``dynamoNN`` for the dynamo exporter at opset NN.
    """
    path = folder / f"{model}_{variant}.onnx"
    if path.exists():
        return path
    module = torchvision_model(model)
    example = torch.randn(1, 3, input_size(model), input_size(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant.startswith("dynamo"):  # "dynamo": the default opset; "dynamo23": opset 23
            opset = {"opset_version": int(variant[6:])} if variant != "dynamo" else {}
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, verbose=False,
                input_names=["input"], output_names=["logits"], **opset,
            )  # fmt: skip
        else:
            torch.onnx.export(
                module, example, str(path), dynamo=False, opset_version=int(variant[-2:]),
                do_constant_folding=variant.startswith("fold"),
                training=torch.onnx.TrainingMode.EVAL,
                input_names=["input"], output_names=["logits"],
            )  # fmt: skip
    return path


@dataclass(frozen=True)
class CellResult:
    """What the check of one exported model found.

    Attributes:
        opset: the file's default-domain opset.
        error: the first failure (one line), or None when every step ran.
        stage: the step that failed (load, import, exactness, train), or "done".
        rel_diff: max |torch - onnxruntime| / max |onnxruntime| at batch 4 (None if not run).
        convs: Conv weights in the normalised graph.
        convs_trained: Conv weights that are parameters and got a gradient.
        frozen: linked weights (other than running statistics) that are not parameters.
        unlinked: weights the pruning groups need that have no torch tensor.
        seconds: time of the check (load to training step).
    """

    opset: int
    error: str | None
    stage: str
    rel_diff: float | None = None
    convs: int = 0
    convs_trained: int = 0
    frozen: tuple[str, ...] = field(default=())
    unlinked: tuple[str, ...] = field(default=())
    seconds: float = 0.0

    @property
    def exact(self) -> bool:
        """Imported, within tolerance, every Conv weight trained, every weight linked."""
        return (
            self.error is None
            and self.rel_diff is not None
            and self.rel_diff <= TOLERANCE
            and self.convs_trained == self.convs
            and not self.frozen
            and not self.unlinked
        )


def check_cell(path: Path, size: int) -> CellResult:
    """Load, import, compare with onnxruntime, and take one training step."""
    from sfp_onnx.graph.analyze import analyze_model
    from sfp_onnx.graph.load import load_model
    from sfp_onnx.training.import_torch import import_model

    opset = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))  # fmt: skip
    start, stage = time.perf_counter(), "load"
    try:
        model = load_model(path)
        analysis = analyze_model(model)
        stage = "import"
        imported = import_model(model)
        stage = "exactness"
        images = cifar_images(count=BATCH, size=size)
        rel_diff = _relative_difference(path, imported.module, images)
        stage = "train"
        convs, trained = _training_step(model, imported, images)
    except Exception as exc:  # the matrix records every failure, whatever its type
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        where = traceback.extract_tb(exc.__traceback__)[-1]
        error = f"{type(exc).__name__}: {lines[0]} ({Path(where.filename).name}:{where.lineno})"
        return CellResult(opset, error, stage, seconds=time.perf_counter() - start)
    needed = {p.tensor for g in analysis.prunable_groups for p in g.slices}
    return CellResult(
        opset=opset,
        error=None,
        stage="done",
        rel_diff=rel_diff,
        convs=convs,
        convs_trained=trained,
        frozen=tuple(sorted(_frozen(imported))),
        unlinked=tuple(sorted(needed - set(imported.links))),
        seconds=time.perf_counter() - start,
    )


def _relative_difference(path: Path, module: torch.nn.Module, images: np.ndarray) -> float:
    """Torch at batch 4 against onnxruntime run at the file's own (fixed) batch."""
    from sfp_onnx.runtime.session import create_session

    session = create_session(path, provider="cpu", threads=1)
    name, batch = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) and batch > 0 else len(images)
    reference = np.concatenate(
        [session.run(None, {name: images[k : k + step]})[0] for k in range(0, len(images), step)]
    )
    with torch.no_grad():
        ours = module.eval()(torch.from_numpy(images)).numpy()
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-30))


def _training_step(model, imported, images: np.ndarray) -> tuple[int, int]:
    """One SGD step at batch 4; counts the Conv weights that are parameters with a gradient."""
    module = imported.module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    labels = torch.arange(len(images)) % 10
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(module(torch.from_numpy(images)), labels).backward()
    parameters = {id(p): p for p in module.parameters()}
    weights = [n.inputs[1].name for n in model.graph if n.op_type == "Conv"]
    trained = 0
    for name in weights:
        param = parameters.get(id(_raw(imported, name))) if name in imported.links else None
        if param is not None and param.grad is not None and param.grad.abs().sum() > 0:
            trained += 1
    optimizer.step()
    return len(weights), trained


def _raw(imported, name: str) -> torch.Tensor:
    """The parameter or buffer a link points at (not the transposed view)."""
    owner, _, attr = imported.links[name].path.rpartition(".")
    return getattr(imported.module.get_submodule(owner), attr)


def _frozen(imported) -> list[str]:
    parameters = {id(p) for p in imported.module.parameters()}
    return [
        name
        for name, link in imported.links.items()
        if not link.path.endswith(("running_mean", "running_var"))
        and id(_raw(imported, name)) not in parameters
    ]
