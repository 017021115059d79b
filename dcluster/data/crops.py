"""The geometry of the crops both loaders apply, and its randomness: a pure function of the
sample's key.

Every random draw of the training augmentation comes from a generator seeded with
(seed, epoch, position in the epoch's list, global index), never from a global RNG, so the
crop an image gets does not depend on which worker decoded it, on how many workers there are,
or on whether the epoch was resumed half way. The position makes two copies of one image in
an epoch get different crops; the index keeps ranks whose lists share positions apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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
                min_scale: float, flip: bool = True) -> CropParams:
    """torchvision's RandomResizedCrop.get_params drawing from ``rng``, plus the flip coin
    (tossed even when ``flip`` is false, so that switching flips off keeps every box).

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
    heads = bool(rng.random() < 0.5)
    return CropParams(*box, flip=flip and heads)


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
