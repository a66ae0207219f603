"""The fast data path: decoded once, cached, augmented in batches like torchvision's path.

Real CIFAR-10 PNGs from ../shared/data/cifar10 (a class-balanced subset), and a synthetic image
whose pixels encode their own coordinates, so a crop's offset and a flip can be read back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfp_onnx.data.datasets import DataConfig, create_transform, load_datasets
from sfp_onnx.data.decoded import (
    Augmentation,
    DecodedImages,
    TensorBatches,
    decode_images,
    decoded_cache_dir,
)
from sfp_onnx.data.loaders import create_loader

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _coordinates() -> np.ndarray:
    """32x32 RGB: red = 8·row + 4, green = 8·column + 4, blue = 255 (never padding)."""
    rows, cols = np.mgrid[0:32, 0:32]
    return np.stack([rows * 8 + 4, cols * 8 + 4, np.full((32, 32), 255)], -1).astype(np.uint8)


def _read_back(image: np.ndarray) -> tuple[int, int, bool]:
    """(top, left, flipped) of a crop of the padded coordinate image, as uint8 HWC."""
    inside = image[..., 2] == 255
    ys, xs = np.nonzero(inside)
    y, x = ys.min(), xs.min()
    row = (int(image[y, x, 0]) - 4) // 8
    col_first, col_last = (int(image[y, x, 1]) - 4) // 8, (int(image[y, xs.max(), 1]) - 4) // 8
    flipped = col_first > col_last
    col = col_last if flipped else col_first
    top = 4 + row - y
    left = 4 + col - (31 - xs.max() if flipped else x)
    return top, left, flipped


def _histograms(samples: list[tuple[int, int, bool]]) -> tuple[np.ndarray, np.ndarray, float]:
    tops = np.bincount([s[0] for s in samples], minlength=9) / len(samples)
    lefts = np.bincount([s[1] for s in samples], minlength=9) / len(samples)
    return tops, lefts, float(np.mean([s[2] for s in samples]))


def test_augmentation_matches_torchvision_statistics() -> None:
    """Crop offsets (0..8 each way) and flip rate: the tensor path draws as torchvision does."""
    count = 3000
    image = _coordinates()
    decoded = DecodedImages(
        torch.from_numpy(image).permute(2, 0, 1)[None].repeat(count, 1, 1, 1),
        torch.zeros(count, dtype=torch.int64), MEAN, STD, Augmentation("crop"),
    )  # fmt: skip
    fast = []
    for batch, _ in TensorBatches(decoded, 500, shuffle=True, seed=7):
        for x in (batch * 255).round().byte().permute(0, 2, 3, 1).numpy():
            fast.append(_read_back(x))
    transform = create_transform((32, 32), MEAN, STD, train=True)
    torch.manual_seed(7)
    pil = Image.fromarray(image)
    slow = [
        _read_back((transform(pil) * 255).round().byte().permute(1, 2, 0).numpy())
        for _ in range(count)
    ]
    (fast_top, fast_left, fast_flip), (slow_top, slow_left, slow_flip) = (
        _histograms(fast), _histograms(slow),
    )  # fmt: skip
    assert np.abs(fast_top - slow_top).max() < 0.03 and np.abs(fast_left - slow_left).max() < 0.03
    assert np.abs(fast_top - 1 / 9).max() < 0.03  # uniform over the 9 offsets
    assert abs(fast_flip - slow_flip) < 0.04 and abs(fast_flip - 0.5) < 0.04


def test_batches_are_seeded_and_cover_the_set_once() -> None:
    images = torch.randint(0, 255, (100, 3, 32, 32), dtype=torch.uint8)
    data = DecodedImages(images, torch.arange(100), MEAN, STD, Augmentation("crop"))
    first = list(TensorBatches(data, 32, shuffle=True, seed=3, drop_last=True))
    again = list(TensorBatches(data, 32, shuffle=True, seed=3, drop_last=True))
    other = list(TensorBatches(data, 32, shuffle=True, seed=4, drop_last=True))
    assert len(first) == 3 and all(len(y) == 32 for _, y in first)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], other[0][0])
    labels = torch.cat([y for _, y in TensorBatches(data, 32, shuffle=True, seed=3)])
    assert sorted(labels.tolist()) == list(range(100))  # without drop_last: every image once
    few = TensorBatches(data.subset(range(10)), 4, shuffle=False, seed=0)
    plain = torch.cat([x for x, _ in few])
    assert plain.shape == (10, 3, 32, 32)


def test_ranks_take_disjoint_shares() -> None:
    """world=2: each rank gets half of the shuffled order, together every image."""
    data = DecodedImages(
        torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10), MEAN, STD,
        Augmentation("none"),
    )  # fmt: skip
    shares = [
        torch.cat([y for _, y in TensorBatches(data, 4, shuffle=True, seed=1, rank=r, world=2)])
        for r in range(2)
    ]
    assert len(shares[0]) == len(shares[1]) == 5
    assert sorted(torch.cat(shares).tolist()) == list(range(10))


def test_cifar_folder_decodes_once_into_the_cache(cifar10_root: Path, tmp_path: Path) -> None:
    """The images are the PNG pixels; a second load reads the cache; an edit rebuilds it."""
    config = DataConfig("cifar10", str(cifar10_root), train_limit=40, eval_limit=30, seed=0)
    data = load_datasets(config, (32, 32))
    assert data.decoded and isinstance(data.train, DecodedImages)
    assert "pad-4 random crops" in data.augmentation
    path, label = data.test.samples[5]
    pixels = np.array(Image.open(path).convert("RGB"))
    assert torch.equal(data.test.images[5], torch.from_numpy(pixels).permute(2, 0, 1))
    assert int(data.test.targets[5]) == label
    cached = sorted(decoded_cache_dir().glob("*.pt"))
    assert len(cached) == 2  # the training and the test folder
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = load_datasets(config, (32, 32))
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read, not rewritten
    assert torch.equal(again.test.images, data.test.images)
    # a copy of a few images, one of them then changed: a new key, decoded again
    folder = tmp_path / "few"
    folder.mkdir()
    samples = [
        (str(shutil.copy(source, folder / f"{i}.png")), label)
        for i, (source, label) in enumerate(data.test.samples[:3])
    ]
    first = decode_images(samples, (32, 32), limit_bytes=2**30)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(samples[0][0])
    os.utime(samples[0][0], ns=(1, 1))
    second = decode_images(samples, (32, 32), limit_bytes=2**30)
    assert first is not None and second is not None
    assert not torch.equal(first[0][0], second[0][0]) and torch.equal(first[0][1], second[0][1])


def test_other_sizes_and_large_sets_stream(cifar10_root: Path) -> None:
    """A 64 px model reads 32 px files through the streaming path; so does a set over budget."""
    config = DataConfig("cifar10", str(cifar10_root), train_limit=20, eval_limit=20)
    data = load_datasets(config, (64, 64))
    assert not data.decoded and not isinstance(data.test, DecodedImages)
    assert "random-resized crops (35%-100%" in data.augmentation
    samples = [(str(p), 0) for p in sorted((cifar10_root / "test" / "cat").iterdir())[:4]]
    assert decode_images(samples, (32, 32), limit_bytes=100) is None


def test_loader_for_a_decoded_set_is_tensor_batches(cifar10_root: Path) -> None:
    config = DataConfig("cifar10", str(cifar10_root), train_limit=64, eval_limit=10)
    data = load_datasets(config, (32, 32))
    loader = create_loader(data.train, 16, shuffle=True, seed=0, drop_last=True)
    assert isinstance(loader, TensorBatches) and len(loader) == 4
    images, labels = next(iter(loader))
    assert images.dtype == torch.float32 and images.shape == (16, 3, 32, 32)
    assert labels.dtype == torch.int64
    streamed = load_datasets(
        DataConfig("cifar10", str(cifar10_root), eval_limit=10, augment=False, decode=False),
        (32, 32), with_train=False,
    ).test  # fmt: skip
    decoded = load_datasets(
        DataConfig("cifar10", str(cifar10_root), eval_limit=10, augment=False),
        (32, 32), with_train=False,
    ).test  # fmt: skip
    batch = next(iter(create_loader(decoded, 10, shuffle=False, seed=0)))[0]
    expected = torch.stack([streamed[i][0] for i in range(10)])
    assert (batch - expected).abs().max() < 1e-5  # the same normalised pixels


def test_training_epochs_decode_no_image(cifar10_root: Path, tmp_path: Path) -> None:
    """Once opened, a decoded set trains its epochs without reading a file: with every image
    file deleted after loading, two epochs of ``train`` still run on the same pixels."""
    from sfp_onnx.training.train import TrainConfig, train

    folder = tmp_path / "images"
    for split, count in (("train", 24), ("test", 4)):
        for name in ("cat", "dog"):
            (folder / split / name).mkdir(parents=True)
            for source in sorted((cifar10_root / split / name).iterdir())[:count]:
                shutil.copy(source, folder / split / name / source.name)
    data = load_datasets(DataConfig("imagefolder", str(folder), val_split=0), (32, 32))
    assert data.decoded and isinstance(data.train, DecodedImages)
    shutil.rmtree(folder)
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )  # fmt: skip
    config = TrainConfig(epochs=2, batch_size=8, device="cpu", workers=2)
    result = train(module, data.train, data.test, config, workdir=tmp_path / "work")
    assert [epoch.epoch for epoch in result.epochs] == [1, 2]
    assert all(epoch.eval_accuracy is not None for epoch in result.epochs)
