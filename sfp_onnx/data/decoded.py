"""The fast data path: a data set decoded once into a uint8 tensor, augmented in batches.

This module owns what happens when a data set fits in memory and its images already have the
model's input size (CIFAR-10/100, small ImageFolder trees). :func:`decode_images` decodes every
image once into a ``uint8 [N, C, H, W]`` tensor, cached on disk under the cache folder (keyed
by the source files' paths, sizes and modification times, so an edit to the data rebuilds it);
a second run reads the cache in a second and the second epoch decodes nothing.
:class:`DecodedImages` is a :class:`torch.utils.data.Dataset` over that tensor, and
:class:`TensorBatches` replaces the DataLoader for it: each batch is gathered, augmented as
tensor ops (pad-4 random crop and horizontal flip, as torchvision's CIFAR recipe; random
resized crops and flips for larger inputs) and normalised, on the training device. The order
and the augmentation of an epoch are drawn from one generator seeded with the loader's seed,
so a run is repeatable and a resumed run bit-identical. The streaming path (PIL decode in
DataLoader workers) stays in :mod:`sfp_onnx.data.datasets` for everything else.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from sfp_onnx._io import atomic_path
from sfp_onnx.errors import OutputError

__all__ = [
    "DECODE_LIMIT_BYTES",
    "Augmentation",
    "DecodedImages",
    "TensorBatches",
    "decode_images",
    "decoded_cache_dir",
]

DECODE_LIMIT_BYTES = 4 * 2**30  # larger data sets stream through loader workers instead
_CACHE_FORMAT = 1
_PAD = 4  # CIFAR-style augmentation: pad 4, crop back to the input size
_RRC_RATIO = (3 / 4, 4 / 3)  # random-resized crop aspect ratios (as torchvision)


def decoded_cache_dir() -> Path:
    """Where decoded data sets are cached (``$XDG_CACHE_HOME/sfp-onnx/decoded``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "sfp-onnx" / "decoded"


@dataclass(frozen=True)
class Augmentation:
    """How a training batch is augmented (``kind`` "none" for evaluation sets)."""

    kind: str  # "none" | "crop" (pad-4 random crop + flip) | "resized" (random-resized crop)
    scale: tuple[float, float] = (0.08, 1.0)  # "resized": area fraction of the crop


class DecodedImages(Dataset):
    """Images as one uint8 tensor, with their labels, normalisation and augmentation.

    Indexing gives one ``(float image, label)`` pair as the streaming path would (augmented
    with torch's global generator); :class:`TensorBatches` is the fast way to iterate.
    ``indices`` are the images' positions in the source data set, ``samples`` their
    ``(file, label)`` pairs when they came from files.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augmentation: Augmentation,
        *,
        indices: Sequence[int] | None = None,
        samples: Sequence[tuple[str, int]] | None = None,
    ) -> None:
        self.images = images
        self.targets = targets
        self.indices = list(range(len(targets))) if indices is None else list(indices)
        self.samples = None if samples is None else list(samples)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augmentation = augmentation
        self._on: dict = {}  # the tensors as batches read them, on one device

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, _ = self.tensors(self.images.device)
        batch = augment(images, torch.tensor([index]), self.augmentation, None)
        return self.normalize(batch)[0], int(self.targets[index])

    def tensors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) on ``device``, made once: images zero-padded for crop augmentation."""
        key = torch.device(device)
        if self._on.get("device") != key:
            images = self.images.to(key)
            if self.augmentation.kind == "crop":
                images = F.pad(images, (_PAD, _PAD, _PAD, _PAD))
            self._on = {"device": key, "images": images, "targets": self.targets.to(key)}
        return self._on["images"], self._on["targets"]

    def subset(self, indices: Sequence[int]) -> DecodedImages:
        """The images at ``indices``, as a data set of its own."""
        picked = list(indices)
        index = torch.as_tensor(picked, dtype=torch.int64)
        return DecodedImages(
            self.images[index], self.targets[index], self.mean.flatten().tolist(),
            self.std.flatten().tolist(), self.augmentation,
            indices=[self.indices[i] for i in picked],
            samples=None if self.samples is None else [self.samples[i] for i in picked],
        )  # fmt: skip

    def with_augmentation(self, augmentation: Augmentation) -> DecodedImages:
        """The same images (tensors shared) with another augmentation, e.g. none for evaluation."""
        return DecodedImages(
            self.images, self.targets, self.mean.flatten().tolist(), self.std.flatten().tolist(),
            augmentation, indices=self.indices, samples=self.samples,
        )  # fmt: skip

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` -> normalised float32: ``(x/255 - mean) / std``."""
        scale = (1.0 / (255.0 * self.std)).to(images.device)
        shift = (self.mean / self.std).to(images.device)
        return images.float().mul_(scale).sub_(shift)


class TensorBatches:
    """Batches of a :class:`DecodedImages` set, gathered and augmented as tensor ops.

    The DataLoader replacement :func:`sfp_onnx.data.loaders.create_loader` returns for a
    decoded set; iterating yields ``(images, labels)`` on ``device``. With ``world`` > 1 each
    rank takes every ``world``-th image of the shuffled order (as a DistributedSampler).
    """

    def __init__(
        self, dataset: DecodedImages, batch_size: int, *, shuffle: bool, seed: int,
        drop_last: bool = False, device: torch.device | str | None = None, rank: int = 0,
        world: int = 1,
    ) -> None:  # fmt: skip
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device or "cpu")
        self.rank, self.world = rank, world

    def _count(self) -> int:
        return math.ceil(len(self.dataset) / self.world)

    def __len__(self) -> int:
        count = self._count()
        if self.drop_last and count > self.batch_size:
            return count // self.batch_size
        return math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        total = len(self.dataset)
        order = torch.randperm(total, generator=generator) if self.shuffle else torch.arange(total)
        if self.world > 1:  # pad to a multiple of world, as DistributedSampler does
            order = torch.cat([order, order[: self._count() * self.world - total]])
            order = order[self.rank :: self.world]
            # the same order on every rank, but each rank its own crops and flips
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank)
        images, targets = self.dataset.tensors(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            if len(index) == 0:
                break
            batch = augment(images, index, self.dataset.augmentation, generator)
            yield self.dataset.normalize(batch), targets[index.to(targets.device)]


def augment(
    images: torch.Tensor,
    index: torch.Tensor,
    augmentation: Augmentation,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The images at ``index``, augmented; the random draws come from ``generator``.

    For ``"crop"`` augmentation ``images`` is the data set zero-padded by 4 (see
    :meth:`DecodedImages.tensors`), so a crop is a slice.
    """
    if augmentation.kind == "none":
        return images[index.to(images.device)]
    flips = (torch.rand(len(index), generator=generator) < 0.5).tolist()
    if augmentation.kind == "crop":
        return _random_crops(images, index, flips, generator)
    batch = _random_resized_crops(images[index.to(images.device)], augmentation.scale, generator)
    for i in [i for i, flip in enumerate(flips) if flip]:
        batch[i] = batch[i].flip(-1)
    return batch


def _random_crops(
    padded: torch.Tensor, index: torch.Tensor, flips: list[bool], generator
) -> torch.Tensor:
    """Crops of the input size at a random offset of each padded image (RandomCrop, pad 4),
    mirrored where ``flips`` says (RandomHorizontalFlip)."""
    count = len(index)
    channels = padded.shape[1]
    height, width = padded.shape[2] - 2 * _PAD, padded.shape[3] - 2 * _PAD
    top = torch.randint(0, 2 * _PAD + 1, (count,), generator=generator).tolist()
    left = torch.randint(0, 2 * _PAD + 1, (count,), generator=generator).tolist()
    out = torch.empty((count, channels, height, width), dtype=padded.dtype, device=padded.device)
    for i, (image, y, x) in enumerate(zip(index.tolist(), top, left, strict=True)):
        crop = padded[image, :, y : y + height, x : x + width]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def _random_resized_crops(
    images: torch.Tensor, scale: tuple[float, float], generator: torch.Generator | None
) -> torch.Tensor:
    """A random-resized crop per image (torchvision's parameters), resized bilinearly."""
    count, _, height, width = images.shape
    boxes = [_crop_box(height, width, scale, generator) for _ in range(count)]
    out = torch.empty_like(images)
    for i, (top, left, h, w) in enumerate(boxes):
        crop = images[i : i + 1, :, top : top + h, left : left + w].float()
        resized = F.interpolate(crop, size=(height, width), mode="bilinear", antialias=True)
        out[i] = resized.round().clamp(0, 255).to(images.dtype)[0]
    return out


def _crop_box(
    height: int, width: int, scale: tuple[float, float], generator: torch.Generator | None
) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params draws them."""
    area = height * width
    log_ratio = (math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(*scale, generator=generator))
        ratio = math.exp(float(torch.empty(1).uniform_(*log_ratio, generator=generator)))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    return 0, 0, height, width  # fallback: the whole image


# --- decoding and the cache --------------------------------------------------------------


def decode_images(
    samples: Sequence[tuple[str, int]], size: tuple[int, int], *, limit_bytes: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every image of ``samples`` ((path, label) pairs) as ``uint8 [N, 3, H, W]``, cached.

    Returns None — stream instead — when the set would take more than ``limit_bytes`` or an
    image does not already have the input ``size`` (resizing belongs to the streaming path).
    """
    height, width = size
    if len(samples) * 3 * height * width > limit_bytes or not samples:
        return None
    path = decoded_cache_dir() / f"{_cache_key(samples, size)}.pt"
    if path.exists():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("format") == _CACHE_FORMAT:
                return cached["images"], cached["targets"]
        except (OSError, RuntimeError, EOFError):
            pass  # a damaged cache file is rebuilt
    images = _decode_all([p for p, _ in samples], size)
    if images is None:
        return None
    targets = torch.tensor([label for _, label in samples], dtype=torch.int64)
    _save_cache(path, images, targets)
    return images, targets


def _cache_key(samples: Sequence[tuple[str, int]], size: tuple[int, int]) -> str:
    digest = hashlib.sha256(f"{_CACHE_FORMAT} {size}".encode())
    for path, label in samples:
        info = os.stat(path)
        digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()[:32]


def _decode_all(paths: Sequence[str], size: tuple[int, int]) -> torch.Tensor | None:
    height, width = size
    images = np.empty((len(paths), height, width, 3), dtype=np.uint8)

    def read(index: int) -> bool:
        with Image.open(paths[index]) as image:
            if image.size != (width, height):
                return False
            images[index] = np.asarray(image.convert("RGB"))
        return True

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        if not all(pool.map(read, range(len(paths)), chunksize=256)):
            return None
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _save_cache(path: Path, images: torch.Tensor, targets: torch.Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save({"format": _CACHE_FORMAT, "images": images, "targets": targets}, tmp)
    except (OSError, OutputError):
        pass  # an unwritable cache only costs the next run the decoding
