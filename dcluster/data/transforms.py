"""Per-sample image transforms whose randomness is a pure function of the sample's key.

Every random draw of the training augmentation comes from a generator seeded with
(seed, epoch, position in the epoch's list, global index), never from a global RNG, so the
crop an image gets does not depend on which worker decoded it, on how many workers there are,
or on whether the epoch was resumed half way. The position makes two copies of one image in
an epoch get different crops; the index keeps ranks whose lists share positions apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# One statistic for all three channels (the mean of ImageNet's), for sources whose colour
# channels are copies of one grey channel.
GRAY_MEAN = (0.449,) * 3
GRAY_STD = (0.226,) * 3

RATIO_RANGE = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop, so the crop distribution is the same


@dataclass(frozen=True)
class CropParams:
    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_generator(seed: int, epoch: int, position: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, position, index])


def sample_crop(rng: np.random.Generator, height: int, width: int,
                min_scale: float) -> CropParams:
    """torchvision's RandomResizedCrop.get_params drawing from ``rng``, plus the flip coin.

    Area fraction uniform in (min_scale, 1), aspect ratio log-uniform in RATIO_RANGE, retried
    until the box fits, with the centre crop clamped to RATIO_RANGE as the fallback.
    """
    area = height * width
    log_ratio = (math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1]))
    box = None
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < RATIO_RANGE[0]:
            w, h = width, int(round(width / RATIO_RANGE[0]))
        elif in_ratio > RATIO_RANGE[1]:
            h, w = height, int(round(height * RATIO_RANGE[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    return CropParams(*box, flip=bool(rng.random() < 0.5))


def normalization(grayscale_stats: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel on the 0..1 scale, shared by every loader."""
    return (GRAY_MEAN, GRAY_STD) if grayscale_stats else (IMAGENET_MEAN, IMAGENET_STD)


def resized_shorter_side(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to ``size``, the longer side truncated
    as torchvision's ``resize(img, size)`` does, so every loader sees the same geometry."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop_origin(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``center_crop`` of a ``crop`` square."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


class SampleTransform(Protocol):
    """Image to normalised tensor; ``position`` and ``index`` key any randomness."""

    def __call__(self, image: Image.Image, position: int, index: int) -> torch.Tensor: ...


class _Normalize:
    def __init__(self, grayscale_stats: bool) -> None:
        mean, std = normalization(grayscale_stats)
        self.mean, self.std = list(mean), list(std)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        return F.normalize(F.to_tensor(image), self.mean, self.std)


class TrainTransform(_Normalize):
    """Random resized crop to ``crop_size`` and a horizontal flip with probability 1/2."""

    def __init__(self, crop_size: int, min_scale: float, seed: int, epoch: int,
                 grayscale_stats: bool = False) -> None:
        super().__init__(grayscale_stats)
        self.crop_size = crop_size
        self.min_scale = min_scale
        self.seed = seed
        self.epoch = epoch

    def __call__(self, image: Image.Image, position: int, index: int) -> torch.Tensor:
        rng = sample_generator(self.seed, self.epoch, position, index)
        p = sample_crop(rng, image.height, image.width, self.min_scale)
        image = F.resized_crop(image, p.top, p.left, p.height, p.width,
                               [self.crop_size, self.crop_size],
                               interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        if p.flip:
            image = F.hflip(image)
        return self.to_tensor(image)


class FeatureTransform(_Normalize):
    """Shorter side to ``resize_size``, then the central ``crop_size`` square; no randomness."""

    def __init__(self, resize_size: int, crop_size: int, grayscale_stats: bool = False) -> None:
        super().__init__(grayscale_stats)
        self.resize_size = resize_size
        self.crop_size = crop_size

    def __call__(self, image: Image.Image, position: int, index: int) -> torch.Tensor:
        height, width = resized_shorter_side(image.height, image.width, self.resize_size)
        image = F.resize(image, [height, width],
                         interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        top, left = center_crop_origin(height, width, self.crop_size)
        return self.to_tensor(F.crop(image, top, left, self.crop_size, self.crop_size))
