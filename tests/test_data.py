"""Tests of sfp_onnx.data.datasets on real CIFAR-10 images: subsets, transforms, loaders, errors."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision import transforms as T

from sfp_onnx.data.datasets import (
    DataConfig,
    balanced_subset,
    check_num_classes,
    create_transform,
    load_datasets,
)
from sfp_onnx.data.decoded import DecodedImages
from sfp_onnx.data.loaders import create_loader
from sfp_onnx.errors import DataError, UsageError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _labels(subset) -> list[int]:
    """Labels of a subset: a Subset of the streaming path, or a decoded data set."""
    if isinstance(subset, DecodedImages):
        return [int(t) for t in subset.targets]
    return [subset.dataset.targets[i] for i in subset.indices]


def _path(subset, index: int) -> str:
    """The image file behind ``subset[index]``, on either path."""
    if isinstance(subset, DecodedImages):
        return subset.samples[index][0]
    return subset.dataset.samples[subset.indices[index]][0]


def _link_tree(source: Path, target: Path, split: str, classes: list[str], per_class: int) -> None:
    """A small ImageFolder split of real CIFAR images (symlinks)."""
    for name in classes:
        (target / split / name).mkdir(parents=True)
        for k in range(per_class):
            (target / split / name / f"{k:04d}.png").symlink_to(source / name / f"{k:04d}.png")


# --- balanced_subset -------------------------------------------------------------------------


def test_balanced_subset_shares_out_what_small_classes_cannot_take() -> None:
    """Class 1 has only 3 images: it gives all of them, the rest split 40 - 3 evenly."""
    targets = [0] * 50 + [1] * 3 + [2] * 20 + [3] * 20
    picked = balanced_subset(targets, 40, seed=0)
    counts = collections.Counter(targets[i] for i in picked)
    assert len(picked) == len(set(picked)) == 40
    assert picked == sorted(picked)
    assert counts[1] == 3
    assert sorted(counts[c] for c in (0, 2, 3)) == [12, 12, 13]


def test_balanced_subset_is_deterministic_per_seed() -> None:
    targets = [i % 7 for i in range(700)]
    assert balanced_subset(targets, 50, seed=3) == balanced_subset(targets, 50, seed=3)
    assert balanced_subset(targets, 50, seed=3) != balanced_subset(targets, 50, seed=4)


def test_balanced_subset_limit_at_least_size_takes_everything() -> None:
    assert balanced_subset([2, 0, 1], 3, seed=0) == [0, 1, 2]
    assert balanced_subset([2, 0, 1], 99, seed=0) == [0, 1, 2]


def test_balanced_subset_rejects_limit_below_one() -> None:
    with pytest.raises(DataError, match=">= 1"):
        balanced_subset([0, 1], 0, seed=0)


@pytest.mark.parametrize("decode", [True, False])
def test_cifar_subsets_are_class_balanced_and_seeded(cifar10_root: Path, decode: bool) -> None:
    """105 test images over 10 classes: five classes get 11, five get 10; train 3 each."""
    config = DataConfig(
        "cifar10", str(cifar10_root), train_limit=30, eval_limit=105, seed=1, decode=decode
    )
    data = load_datasets(config, (32, 32))
    test_counts = collections.Counter(_labels(data.test))
    assert sorted(test_counts.values()) == [10] * 5 + [11] * 5
    assert collections.Counter(_labels(data.train)) == dict.fromkeys(range(10), 3)
    again = load_datasets(config, (32, 32))
    assert again.test.indices == data.test.indices
    assert again.train.indices == data.train.indices
    other = DataConfig("cifar10", str(cifar10_root), eval_limit=105, seed=2, decode=decode)
    assert load_datasets(other, (32, 32), with_train=False).test.indices != data.test.indices


@pytest.mark.parametrize("decode", [True, False])
def test_validation_split_is_carved_from_train_balanced_and_unaugmented(
    cifar10_root: Path, tmp_path: Path, decode: bool
) -> None:
    """val_split 0.25 of 40 train images: 10 held out (one per class), none left in train."""
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"]
    classes.append("truck")
    _link_tree(cifar10_root / "train", tmp_path, "train", classes, 4)
    _link_tree(cifar10_root / "test", tmp_path, "test", classes, 1)
    config = DataConfig("imagefolder", str(tmp_path), val_split=0.25, decode=decode)
    data = load_datasets(config, (32, 32))
    assert (len(data.train), len(data.val)) == (30, 10)
    assert sorted(_labels(data.val)) == list(range(10))
    train_files = {_path(data.train, i) for i in range(len(data.train))}
    val_files = {_path(data.val, i) for i in range(len(data.val))}
    assert not train_files & val_files and len(train_files | val_files) == 40
    assert torch.equal(data.val[3][0], data.val[3][0])  # the eval transform: no random crop
    again = load_datasets(config, (32, 32))
    assert {_path(again.val, i) for i in range(10)} == val_files


# --- datasets and transforms -----------------------------------------------------------------


@pytest.mark.parametrize("decode", [True, False])
def test_cifar_imagefolder_images_are_normalised_pixels(cifar10_root: Path, decode) -> None:
    """An eval image at 32 px is exactly (png / 255 - mean) / std of the CIFAR preset."""
    config = DataConfig("cifar10", str(cifar10_root), eval_limit=20, augment=False, decode=decode)
    data = load_datasets(config, (32, 32))
    assert data.classes[:3] == ("airplane", "automobile", "bird")
    assert data.num_classes == 10
    assert (data.mean, data.std) == (CIFAR_MEAN, CIFAR_STD)
    image, label = data.test[7]
    path, expected_label = _path(data.test, 7), _labels(data.test)[7]
    pixels = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255
    expected = (pixels - np.array(CIFAR_MEAN, np.float32)) / np.array(CIFAR_STD, np.float32)
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert label == expected_label
    np.testing.assert_allclose(image.numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    # augment=False: the training set uses the same deterministic transform
    assert torch.equal(data.train[0][0], data.train[0][0])


def test_custom_mean_std_replace_the_preset(cifar10_root: Path) -> None:
    config = DataConfig("cifar10", str(cifar10_root), mean=(0.5, 0.5, 0.5), std=[0.25] * 3)
    data = load_datasets(config, (32, 32), with_train=False)
    assert data.train is None and data.std == (0.25, 0.25, 0.25)
    image, _ = data.test[0]
    path = data.test.samples[0][0]  # the whole test set: an ImageFolder, or decoded from one
    pixels = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255
    np.testing.assert_allclose(image.numpy(), (pixels.transpose(2, 0, 1) - 0.5) / 0.25, atol=1e-5)


def test_larger_input_resizes_eval_images(cifar10_root: Path) -> None:
    """At 64 px the 32 px images are upsampled: same picture, same mean, twice the size."""
    config = DataConfig("cifar10", str(cifar10_root), eval_limit=10)
    small = load_datasets(config, (32, 32), with_train=False).test[3][0]
    large = load_datasets(config, (64, 64), with_train=False).test[3][0]
    assert large.shape == (3, 64, 64)
    assert abs(float(large.mean() - small.mean())) < 0.02
    downsampled = torch.nn.functional.avg_pool2d(large[None], 2)[0]
    assert float((downsampled - small).abs().mean()) < 0.1


def test_train_transform_for_32_px_pads_and_crops(cifar10_root: Path) -> None:
    """32 px: pad-4 random crop + flip; some draws show the zero padding at a border."""
    transform = create_transform((32, 32), CIFAR_MEAN, CIFAR_STD, train=True)
    kinds = [type(t) for t in transform.transforms]
    assert T.RandomCrop in kinds and T.RandomHorizontalFlip in kinds
    assert T.RandomResizedCrop not in kinds
    image = Image.open(cifar10_root / "test/cat/0000.png").convert("RGB")
    torch.manual_seed(0)
    draws = [transform(image) for _ in range(20)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert len({d.numpy().tobytes() for d in draws}) > 1
    padded = (-torch.tensor(CIFAR_MEAN) / torch.tensor(CIFAR_STD))[:, None]
    borders = [d[:, :, 0] for d in draws] + [d[:, :, -1] for d in draws]
    assert any(torch.allclose(b, padded.expand_as(b), atol=1e-6) for b in borders)


def test_train_transform_for_64_px_uses_random_resized_crops(cifar10_root: Path) -> None:
    transform = create_transform((64, 64), CIFAR_MEAN, CIFAR_STD, train=True)
    kinds = [type(t) for t in transform.transforms]
    assert T.RandomResizedCrop in kinds and T.RandomHorizontalFlip in kinds
    assert T.RandomCrop not in kinds
    image = Image.open(cifar10_root / "test/cat/0000.png").convert("RGB")
    torch.manual_seed(0)
    assert transform(image).shape == (3, 64, 64)
    evaluation = create_transform((64, 64), CIFAR_MEAN, CIFAR_STD, train=False)
    assert torch.equal(evaluation(image), evaluation(image))


def test_imagefolder_reads_val_folder_with_imagenet_preset(
    cifar10_root: Path, tmp_path: Path
) -> None:
    classes = ["bird", "cat", "ship"]
    _link_tree(cifar10_root / "train", tmp_path, "train", classes, 4)
    _link_tree(cifar10_root / "test", tmp_path, "val", classes, 2)
    data = load_datasets(DataConfig("imagefolder", str(tmp_path), val_split=0.0), (32, 32))
    assert data.classes == tuple(classes)
    assert (len(data.train), len(data.test)) == (12, 6) and data.val is None
    assert data.mean == (0.485, 0.456, 0.406)
    assert data.test[5][1] == 2 and data.test[5][0].shape == (3, 32, 32)


# --- loaders ---------------------------------------------------------------------------------


def _order(loader) -> list[int]:
    return [int(v) for (batch,) in loader for v in batch]


def test_create_loader_shuffles_deterministically_per_seed() -> None:
    dataset = TensorDataset(torch.arange(64))
    first = _order(create_loader(dataset, 8, shuffle=True, seed=5, workers=0))
    assert sorted(first) == list(range(64)) and first != list(range(64))
    assert _order(create_loader(dataset, 8, shuffle=True, seed=5, workers=0)) == first
    assert _order(create_loader(dataset, 8, shuffle=True, seed=6, workers=0)) != first
    assert _order(create_loader(dataset, 8, shuffle=False, seed=5, workers=0)) == list(range(64))


def test_create_loader_rejects_bad_sizes() -> None:
    dataset = TensorDataset(torch.arange(4))
    with pytest.raises(UsageError, match="batch size 0"):
        create_loader(dataset, 0, shuffle=False, seed=0)
    with pytest.raises(UsageError, match="workers is -1"):
        create_loader(dataset, 1, shuffle=False, seed=0, workers=-1)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "mnist"}, "unknown dataset 'mnist'; choose one of cifar10, cifar100"),
        ({"name": "cifar10", "mean": (0.5, 0.5)}, "mean has 2 values; give 3"),
        ({"name": "cifar10", "std": (0.2, 0.2, 0.2, 0.2)}, "std has 4 values; give 3"),
        ({"name": "cifar10", "std": (0.2, 0.0, 0.2)}, "every std must be positive"),
        ({"name": "cifar10", "train_limit": 0}, "train_limit is 0; give a number of images >= 1"),
        ({"name": "cifar10", "eval_limit": -3}, "eval_limit is -3"),
    ],
)
def test_bad_config_values_raise_one_line_data_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError) as info:
        DataConfig(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def _tree(root: Path, *folders: str) -> Path:
    for folder in folders:
        (root / folder).mkdir(parents=True)
    return root


@pytest.mark.parametrize(
    ("name", "layout", "message"),
    [
        ("cifar10", None, "does not exist; check the path"),
        ("cifar10", (), "is empty; it needs train/ and test/"),
        ("cifar10", ("notes",), "holds neither train/ and test/ image folders nor"),
        ("cifar10", ("cifar-10-batches-py",), "could not read CIFAR-10 in"),
        ("imagefolder", ("test/cat",), "has no train/ folder"),
        ("imagefolder", ("train/cat",), "has no test/ (or val/) folder"),
        ("imagefolder", ("train/cat", "test/cat"), "has no images; it needs one folder per class"),
        ("imagefolder", ("train", "test"), "has no images"),
    ],
)
def test_bad_data_roots_raise_one_line_data_errors(
    tmp_path: Path, name: str, layout: tuple[str, ...] | None, message: str
) -> None:
    root = tmp_path / "data"
    if layout:
        _tree(root, *layout)
    elif layout is not None:
        root.mkdir()
    with pytest.raises(DataError) as info:
        load_datasets(DataConfig(name, str(root), download=False), (32, 32))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_imagefolder_without_root_says_what_it_needs() -> None:
    with pytest.raises(DataError, match="needs a data root with train/ and test/"):
        load_datasets(DataConfig("imagefolder"), (32, 32))


def test_cifar_folder_with_other_class_count_is_refused(cifar10_root: Path, tmp_path: Path) -> None:
    _link_tree(cifar10_root / "train", tmp_path, "train", ["cat", "dog"], 1)
    _link_tree(cifar10_root / "test", tmp_path, "test", ["cat", "dog"], 1)
    with pytest.raises(DataError, match="has 2 class folders but CIFAR-10 has 10; use dataset"):
        load_datasets(DataConfig("cifar10", str(tmp_path)), (32, 32))


def test_train_and_test_classes_must_agree(cifar10_root: Path, tmp_path: Path) -> None:
    _link_tree(cifar10_root / "train", tmp_path, "train", ["cat", "dog"], 1)
    _link_tree(cifar10_root / "test", tmp_path, "test", ["cat", "frog"], 1)
    with pytest.raises(DataError, match="have different class folders"):
        load_datasets(DataConfig("imagefolder", str(tmp_path)), (32, 32))


def test_model_channels_must_match_rgb(cifar10_root: Path) -> None:
    with pytest.raises(DataError, match=r"takes 1-channel images .* 3 input channels"):
        load_datasets(DataConfig("cifar10", str(cifar10_root)), (32, 32), channels=1)


def test_check_num_classes_names_both_counts(cifar10_root: Path) -> None:
    data = load_datasets(DataConfig("cifar10", str(cifar10_root)), (32, 32), with_train=False)
    check_num_classes(10, data)
    with pytest.raises(DataError) as info:
        check_num_classes(1000, data)
    assert str(info.value).startswith("model has 1000 outputs but the dataset has 10 classes")
