"""Shared pytest fixtures: where the real test data lives.

Keep this file to fixtures that several test modules use; a fixture used by one module belongs
in that module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Under pytest-xdist every test process gets its share of the cores, before torch (or a
# subprocess started by a test) sizes its thread pool: two processes of two threads each on
# two cores run slower than two of one.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

# Real CIFAR-10 as an ImageFolder tree, beside the repository (see its README.txt).
_DEFAULT_CIFAR10 = Path(__file__).resolve().parents[2] / "shared/data/cifar10"


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """The CIFAR-10 ImageFolder tree (``train/<class>/*.png``, ``test/...``).

    ``$SFP_ONNX_CIFAR10`` overrides the default ``../shared/data/cifar10``; tests that need the
    images are skipped when it is absent.
    """
    root = Path(os.environ.get("SFP_ONNX_CIFAR10", _DEFAULT_CIFAR10))
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        pytest.skip(
            f"real CIFAR-10 not found at {root}; set SFP_ONNX_CIFAR10 to a folder with "
            "train/<class>/*.png and test/<class>/*.png"
        )
    return root


@pytest.fixture(scope="module")
def resnet8(tmp_path_factory, cifar10_root: Path) -> Path:
    """A CIFAR ResNet-8 (BN kept, seeded weights) exported to ONNX, once per test module;
    the tests that train it use the real CIFAR-10 images, so it needs them too."""
    import torch

    from sfp_onnx.training.zoo import create_cifar_resnet, export_onnx

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet8") / "resnet8.onnx"
    export_onnx(create_cifar_resnet(8), path)
    return path
