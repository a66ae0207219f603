"""Data: image datasets, their transforms and class-balanced subsets.

This module owns the way from a dataset name (and an optional folder) to torch datasets that
yield normalised ``(C, H, W)`` float tensors of the model's input size, plus the seeded,
class-balanced subsets that training and evaluation read (through the loaders of
:mod:`sfp_onnx.data.loaders`). CIFAR-10
and CIFAR-100 come as an ImageFolder tree (``train/<class>/*.png``, ``test/...``), as
torchvision's pickled batches, or by download; other datasets as an ImageFolder tree. Running
models on the data is left to :mod:`sfp_onnx.runtime.evaluate` and the training stage.
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from sfp_onnx.data.decoded import (
    DECODE_LIMIT_BYTES,
    Augmentation,
    DecodedImages,
    decode_images,
)
from sfp_onnx.data.names import DATASETS
from sfp_onnx.errors import DataError

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIR",
    "DataConfig",
    "Datasets",
    "balanced_subset",
    "check_num_classes",
    "create_transform",
    "describe_augmentation",
    "load_datasets",
    "train_augmentation",
]

# torchvision downloads CIFAR here when no root is given.
DEFAULT_DATA_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sfp-onnx/data"
# Inputs up to this side length get CIFAR-style augmentation (pad 4 + random crop).
SMALL_INPUT = 32
# Inputs up to this side length get random-resized crops of at least 35% of the image (the
# ImageNet recipe's 8% leaves a few pixels of a 64 px image); larger ones the full range.
MID_INPUT = 128


@dataclass(frozen=True)
class _Preset:
    """What a dataset name implies: normalisation, eval crop ratio, CIFAR layout."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float  # eval: resize the shorter side to size / crop_pct, then centre-crop
    num_classes: int | None = None  # CIFAR: the class count an ImageFolder tree must have
    torchvision_class: type | None = None  # CIFAR: torchvision's dataset class
    batches_dir: str | None = None  # CIFAR: the folder torchvision's pickled batches live in


_PRESETS = {
    "cifar10": _Preset(
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        crop_pct=1.0,
        num_classes=10,
        torchvision_class=tv_datasets.CIFAR10,
        batches_dir="cifar-10-batches-py",
    ),
    "cifar100": _Preset(
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        crop_pct=1.0,
        num_classes=100,
        torchvision_class=tv_datasets.CIFAR100,
        batches_dir="cifar-100-python",
    ),
    "imagefolder": _Preset(  # ImageNet statistics, resize 256 / crop 224 style evaluation
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875
    ),
}
# What an opener returns: (train set or None, test set, class names in label order).
_Opened = tuple[Dataset | None, Dataset, list[str]]
_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagefolder": "the image folder"}


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to read and how; validated on construction (raises :class:`DataError`).

    Attributes:
        name: ``cifar10``, ``cifar100`` or ``imagefolder``.
        root: dataset folder; ``None`` downloads CIFAR into :data:`DEFAULT_DATA_DIR`.
        mean: per-channel normalisation mean; ``None`` takes the dataset's preset.
        std: per-channel normalisation std (all > 0); ``None`` takes the dataset's preset.
        train_limit: use a class-balanced subset of this many training images.
        eval_limit: use a class-balanced subset of this many validation and test images.
        val_split: fraction of the training images set aside (class-balanced, seeded) as the
            validation set that training monitors; the test set is left for the before and
            after figures. 0 keeps every training image for training.
        seed: seed of the subsets (and nothing else).
        augment: random crops and flips on the training set; False uses the eval transform.
        download: let torchvision download CIFAR when the root does not hold it.
        decode: hold a data set whose images have the input size in memory, decoded once
            and augmented in batches (:mod:`sfp_onnx.data.decoded`); False always streams.
    """

    name: str
    root: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    train_limit: int | None = None
    eval_limit: int | None = None
    val_split: float = 0.1
    seed: int = 0
    augment: bool = True
    download: bool = True
    decode: bool = True

    def __post_init__(self) -> None:
        if self.name not in _PRESETS:
            raise DataError(f"unknown dataset {self.name!r}; choose one of {', '.join(DATASETS)}")
        for field in ("mean", "std"):
            value = getattr(self, field)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != 3:
                    raise DataError(f"{field} has {len(value)} values; give 3, one per RGB channel")
                object.__setattr__(self, field, value)
        if self.std is not None and not all(s > 0 for s in self.std):
            raise DataError(f"std {self.std} has a value <= 0; every std must be positive")
        for field in ("train_limit", "eval_limit"):
            limit = getattr(self, field)
            if limit is not None and limit < 1:
                raise DataError(f"{field} is {limit}; give a number of images >= 1")
        if not 0.0 <= self.val_split < 1.0:
            raise DataError(f"val_split is {self.val_split}; give a fraction in [0, 1)")
        if self.root is not None:
            object.__setattr__(self, "root", str(self.root))

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)``: the given values, or the dataset's preset where not given."""
        preset = _PRESETS[self.name]
        return (self.mean or preset.mean, self.std or preset.std)


@dataclass(frozen=True)
class Datasets:
    """The datasets of one :class:`DataConfig`, ready for a loader.

    Attributes:
        train: training images (``None`` when loaded with ``with_train=False``).
        test: evaluation images.
        val: validation images set aside from the training set (``None`` without a split).
        classes: class names, in label order.
        mean: the normalisation mean applied.
        std: the normalisation std applied.
    """

    train: Dataset | None
    test: Dataset
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: str = "none"  # the training transform, in words
    decoded: bool = False  # held in memory as decoded tensors (else streamed from files)
    val: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """The number of classes (labels are ``0 .. num_classes - 1``)."""
        return len(self.classes)


@dataclass(frozen=True)
class _FitToSize:
    """Resize the shorter side to ``max(size) / crop_pct`` and centre-crop to ``size``.

    Images already of the target size pass through untouched (CIFAR at 32x32).
    """

    size: tuple[int, int]  # (height, width)
    crop_pct: float

    def __call__(self, image: Image.Image) -> Image.Image:
        height, width = self.size
        if image.size == (width, height):
            return image
        image = TF.resize(image, math.floor(max(self.size) / self.crop_pct))
        return TF.center_crop(image, [height, width])


def create_transform(
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    train: bool,
    crop_pct: float = 1.0,
) -> T.Compose:
    """The transform from a PIL image to a normalised tensor of ``input_size``.

    Training (``train=True``): inputs up to 32 px get pad-4 random crops and flips (CIFAR
    style); larger inputs get random-resized crops and flips (of at least 35% of the area up
    to 128 px, 8% above, see :func:`train_augmentation`). Evaluation resizes and
    centre-crops images whose size differs from ``input_size`` and leaves the others alone.

    Args:
        input_size: ``(height, width)`` of the model input.
        mean: per-channel mean.
        std: per-channel std.
        train: the augmenting training transform rather than the evaluation one.
        crop_pct: evaluation crop ratio (0.875 gives ImageNet's resize 256, crop 224).
    """
    size = (int(input_size[0]), int(input_size[1]))
    fit = _FitToSize(size, crop_pct)
    if not train:
        steps = [fit]
    elif train_augmentation(size).kind == "crop":
        steps = [fit, T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
    else:
        scale = train_augmentation(size).scale
        steps = [T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip()]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(list(mean), list(std))])


def train_augmentation(input_size: tuple[int, int]) -> Augmentation:
    """The training augmentation for an input size (both data paths apply the same one)."""
    if max(input_size) <= SMALL_INPUT:
        return Augmentation("crop")
    return Augmentation("resized", (0.35, 1.0) if max(input_size) <= MID_INPUT else (0.08, 1.0))


def describe_augmentation(augmentation: Augmentation) -> str:
    """One line for the user: what the training images go through."""
    if augmentation.kind == "crop":
        return "pad-4 random crops and horizontal flips (CIFAR style)"
    if augmentation.kind == "resized":
        low = augmentation.scale[0]
        return f"random-resized crops ({low:.0%}-100% of the area) and horizontal flips"
    return "none"


def load_datasets(
    config: DataConfig,
    input_size: tuple[int, int],
    *,
    channels: int = 3,
    with_train: bool = True,
) -> Datasets:
    """Open the train and test sets of ``config`` with transforms for ``input_size``.

    Args:
        config: which dataset, where, and how.
        input_size: ``(height, width)`` of the model input.
        channels: input channels of the model; the datasets give RGB images, so it must be 3.
        with_train: False skips the training set (evaluation only); ``train`` is then None.

    Raises:
        DataError: missing or empty folders, a model that does not take RGB input, train and
            test classes that disagree, a failed download.
    """
    mean, std = config.normalization
    if channels != len(mean):
        raise DataError(
            f"the model takes {channels}-channel images but the datasets give RGB images "
            f"normalised over {len(mean)} channels; use a model with 3 input channels"
        )
    preset = _PRESETS[config.name]
    eval_tf = create_transform(input_size, mean, std, train=False, crop_pct=preset.crop_pct)
    train_tf = create_transform(input_size, mean, std, train=True) if config.augment else eval_tf
    opener = _open_imagefolder if config.name == "imagefolder" else _open_cifar
    train, test, classes = opener(config, train_tf, eval_tf, with_train)
    augmentation = train_augmentation(input_size) if config.augment else Augmentation("none")
    decoded = False
    if config.decode:
        test = _decoded(test, input_size, mean, std, Augmentation("none")) or test
        if train is not None:
            train = _decoded(train, input_size, mean, std, augmentation) or train
        decoded = isinstance(test, DecodedImages) and isinstance(train, DecodedImages | None)
    val = None
    if train is not None and config.val_split > 0:
        train, val = _split(train, config.val_split, config.seed, eval_tf)
    if train is not None and config.train_limit is not None:
        train = _subset(train, balanced_subset(_targets(train), config.train_limit, config.seed))
    if config.eval_limit is not None:
        test = _subset(test, balanced_subset(test.targets, config.eval_limit, config.seed))
        if val is not None:
            val = _subset(val, balanced_subset(_targets(val), config.eval_limit, config.seed))
    return Datasets(
        train=train, test=test, classes=tuple(classes), mean=mean, std=std,
        augmentation=describe_augmentation(augmentation), decoded=decoded, val=val,
    )  # fmt: skip


def _targets(dataset: Dataset) -> list[int]:
    """Every image's label, through Subsets, without reading an image."""
    if isinstance(dataset, Subset):
        inner = _targets(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    return [int(t) for t in dataset.targets]


def _split(train: Dataset, fraction: float, seed: int, eval_tf) -> tuple[Dataset, Dataset]:
    """(train without the validation images, the validation images with the eval transform)."""
    targets = _targets(train)
    held = set(balanced_subset(targets, max(1, round(fraction * len(targets))), seed))
    rest = [i for i in range(len(targets)) if i not in held]
    if isinstance(train, DecodedImages):
        evaluation = train.with_augmentation(Augmentation("none"))
    else:
        evaluation = copy.copy(train)  # the same files, read with the evaluation transform
        evaluation.transform = eval_tf
    return _subset(train, rest), _subset(evaluation, sorted(held))


def _subset(dataset: Dataset, indices: list[int]) -> Dataset:
    """The images at ``indices``; a subset of a subset stays one Subset over the files."""
    if isinstance(dataset, DecodedImages):
        return dataset.subset(indices)
    if isinstance(dataset, Subset):
        return Subset(dataset.dataset, [dataset.indices[i] for i in indices])
    return Subset(dataset, indices)


def _decoded(
    dataset: Dataset, size: tuple[int, int], mean, std, augmentation: Augmentation
) -> DecodedImages | None:
    """``dataset`` decoded into memory, or None when it must stream (see decode_images)."""
    data = getattr(dataset, "data", None)  # torchvision's CIFAR: uint8 [N, H, W, 3] in memory
    if data is not None and tuple(data.shape[1:3]) == tuple(size):
        images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
        targets = torch.as_tensor(dataset.targets, dtype=torch.int64)
    elif hasattr(dataset, "samples"):  # an ImageFolder
        found = decode_images(dataset.samples, size, limit_bytes=DECODE_LIMIT_BYTES)
        if found is None:
            return None
        images, targets = found
        return DecodedImages(images, targets, mean, std, augmentation, samples=dataset.samples)
    else:
        return None
    return DecodedImages(images, targets, mean, std, augmentation)


def _open_imagefolder(
    config: DataConfig, train_tf: T.Compose, eval_tf: T.Compose, with_train: bool
) -> _Opened:
    if config.root is None:
        raise DataError(
            "dataset 'imagefolder' needs a data root with train/ and test/ (or val/) folders"
        )
    root = _existing_root(config.root)
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        missing = "train/" if not (root / "train").is_dir() else "test/ (or val/)"
        raise DataError(
            f"{root} has no {missing} folder; an image-folder dataset needs "
            "train/<class>/<images> and test/<class>/<images> (or val/)"
        )
    return _read_image_folders(root / "train", test_dir, train_tf, eval_tf, with_train)


def _open_cifar(
    config: DataConfig, train_tf: T.Compose, eval_tf: T.Compose, with_train: bool
) -> _Opened:
    preset = _PRESETS[config.name]
    pretty = _PRETTY[config.name]
    if config.root is None:
        root = DEFAULT_DATA_DIR
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = _existing_root(config.root)
        train_dir, test_dir = root / "train", root / "test"
        if train_dir.is_dir() and test_dir.is_dir():
            found = _read_image_folders(train_dir, test_dir, train_tf, eval_tf, with_train)
            if len(found[2]) != preset.num_classes:
                raise DataError(
                    f"{test_dir} has {len(found[2])} class folders but {pretty} has "
                    f"{preset.num_classes}; use dataset 'imagefolder' for other datasets"
                )
            return found
    has_batches = (root / preset.batches_dir).is_dir()
    if not has_batches and not config.download:
        raise DataError(
            f"{root} holds neither train/ and test/ image folders nor {preset.batches_dir}; "
            f"point the data root at {pretty}, or allow downloading"
        )
    try:
        make = preset.torchvision_class
        test = make(str(root), train=False, transform=eval_tf, download=not has_batches)
        train = make(str(root), train=True, transform=train_tf) if with_train else None
    except (OSError, RuntimeError) as exc:
        action = "read" if has_batches else "download"
        raise DataError(
            f"could not {action} {pretty} in {root}: {_first_line(exc)}; check the network "
            "or point the data root at a copy of the dataset"
        ) from exc
    return train, test, list(test.classes)


def _read_image_folders(
    train_dir: Path, test_dir: Path, train_tf: T.Compose, eval_tf: T.Compose, with_train: bool
) -> _Opened:
    test = _image_folder(test_dir, eval_tf)
    train = _image_folder(train_dir, train_tf) if with_train else None
    if train is not None and train.classes != test.classes:
        raise DataError(
            f"{train_dir} and {test_dir} have different class folders "
            f"({len(train.classes)} vs {len(test.classes)}); both need the same <class> folders"
        )
    return train, test, list(test.classes)


def _image_folder(folder: Path, transform: T.Compose) -> tv_datasets.ImageFolder:
    try:
        return tv_datasets.ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as exc:
        raise DataError(
            f"{folder} has no images; it needs one folder per class with image files "
            f"inside ({folder}/<class>/<image>.png)"
        ) from exc


def _existing_root(root: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data root {path} does not exist; check the path")
    if not path.is_dir():
        raise DataError(f"data root {path} is a file, not a folder")
    if not any(path.iterdir()):
        raise DataError(f"data root {path} is empty; it needs train/ and test/ image folders")
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def balanced_subset(targets: Sequence[int], limit: int, seed: int) -> list[int]:
    """Pick ``limit`` indices with (as far as possible) equal counts per class.

    Classes smaller than their share give all their images and the rest is shared among
    the others; the last few images go to classes chosen at random. The choice depends only
    on ``targets``, ``limit`` and ``seed``.

    Args:
        targets: the label of every image.
        limit: how many indices to pick; all of them when it is at least ``len(targets)``.
        seed: seed of the random choice.

    Returns:
        The picked indices, ascending.

    Raises:
        DataError: ``limit`` < 1.
    """
    if limit < 1:
        raise DataError(f"subset size {limit} is too small; give a number of images >= 1")
    labels = [int(t) for t in targets]
    if limit >= len(labels):
        return list(range(len(labels)))
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(seed)
    counts = _balanced_counts({c: len(v) for c, v in sorted(by_class.items())}, limit, rng)
    picked = [i for c, n in counts.items() for i in rng.sample(by_class[c], n)]
    return sorted(picked)


def _balanced_counts(sizes: dict[int, int], limit: int, rng: random.Random) -> dict[int, int]:
    counts = dict.fromkeys(sizes, 0)
    remaining = limit
    while remaining:
        open_classes = [c for c in sizes if counts[c] < sizes[c]]
        share = remaining // len(open_classes)
        if share == 0:  # fewer images left than classes: one more for random classes
            for c in rng.sample(open_classes, remaining):
                counts[c] += 1
            break
        for c in open_classes:
            extra = min(share, sizes[c] - counts[c])
            counts[c] += extra
            remaining -= extra
    return counts


def check_num_classes(model_classes: int, data: Datasets) -> None:
    """Raise :class:`DataError` unless the model has one output per dataset class."""
    if model_classes != data.num_classes:
        raise DataError(
            f"model has {model_classes} outputs but the dataset has {data.num_classes} "
            "classes; use a model trained for this dataset"
        )
