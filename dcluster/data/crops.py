"""The geometry of the crops both loaders apply, and its randomness: a pure function of the
sample's key.

Every random draw of the training augmentation comes from a generator seeded with
(seed, epoch, position in the epoch's list, global index), never from a global RNG, so the
crop an image gets does not depend on which worker decoded it, on how many workers there are,
or on whether the epoch was resumed half way. The position makes two copies of one image in
an epoch get different crops; the index keeps ranks whose lists share positions apart.
With multi-crop (``data.crops``) the view number joins the key, so the views of one image
differ and each is still a pure function of (seed, epoch, position, index, view).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from dcluster.core.config import DataConfig

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
    # degrees counter-clockwise, about the image's centre, applied to the whole image before
    # the window is cut (corners filled black)
    angle: float = 0.0


@dataclass(frozen=True)
class Augmentation:
    """What a training crop may be (the ``data.*`` keys that shape it), for both loaders."""
    min_scale: float = 0.08
    flip: bool = True
    crop_sides: tuple[int, ...] = ()  # empty: the random resized crop of min_scale
    rotation_degrees: float = 0.0
    max_scale: float = 1.0  # upper bound of the area fraction (a data.crops group's)

    @classmethod
    def of(cls, cfg: DataConfig) -> "Augmentation":
        return cls(cfg.min_scale, cfg.flip, tuple(cfg.crop_sides), cfg.rotation_degrees)

    @property
    def rotates(self) -> bool:
        return self.rotation_degrees > 0

    def sample(self, rng: np.random.Generator, height: int, width: int) -> CropParams:
        return sample_crop(rng, height, width, self.min_scale, self.flip, self.crop_sides,
                           self.rotation_degrees, self.max_scale)


@dataclass(frozen=True)
class View:
    """One training view: its side, its augmentation, and the number that keys its randomness
    (None: the single training crop, keyed as before multi-crop existed)."""
    size: int
    augmentation: Augmentation
    number: Optional[int] = None


def training_views(cfg: DataConfig) -> tuple[View, ...]:
    """The views of each training image: the one crop of crop_size without ``data.crops``,
    else each group's ``count`` views in the declared order, numbered 0, 1, ... over all
    groups, each the random resized crop of its group's scale range (the flip and rotation
    of the single crop kept)."""
    base = Augmentation.of(cfg)
    if not cfg.crops:
        return (View(cfg.crop_size, base),)
    views = []
    for group in cfg.crops:
        low, high = group["scale"]
        augmentation = replace(base, min_scale=float(low), max_scale=float(high), crop_sides=())
        views += [View(int(group["size"]), augmentation)] * int(group["count"])
    return tuple(replace(view, number=number) for number, view in enumerate(views))


def sample_generator(seed: int, epoch: int, position: int, index: int,
                     view: Optional[int] = None) -> np.random.Generator:
    """The generator of one sample's draws; ``view`` (multi-crop) keys one view of it."""
    key = [seed, epoch, position, index] if view is None else [seed, epoch, position, index, view]
    return np.random.default_rng(key)


def sample_crop(rng: np.random.Generator, height: int, width: int, min_scale: float,
                flip: bool = True, crop_sides: Sequence[int] = (),
                rotation_degrees: float = 0.0, max_scale: float = 1.0) -> CropParams:
    """torchvision's RandomResizedCrop.get_params drawing from ``rng`` (or, with
    ``crop_sides``, RandomChoice over RandomCrop of those sides), then the flip coin (tossed
    even when ``flip`` is false, so that switching flips off keeps every box), then the angle
    (uniform in [-rotation_degrees, rotation_degrees]; drawn last, so that the boxes and coins
    of a run without rotation are those of the releases before it).
    """
    box = (square_box(rng, height, width, crop_sides) if crop_sides
           else resized_crop_box(rng, height, width, min_scale, max_scale))
    heads = bool(rng.random() < 0.5)
    angle = float(rng.uniform(-rotation_degrees, rotation_degrees)) if rotation_degrees else 0.0
    return CropParams(*box, flip=flip and heads, angle=angle)


def square_box(rng: np.random.Generator, height: int, width: int,
               sides: Sequence[int]) -> tuple[int, int, int, int]:
    """(top, left, side, side): a side drawn uniformly from ``sides`` (clamped to the image's
    shorter side), placed uniformly, as the MMDC code's MNIST crops (torchvision RandomChoice
    of RandomCrop(24), (20), (16) on 28 x 28 digits)."""
    side = min(int(sides[int(rng.integers(len(sides)))]), height, width)
    return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side, side


def resized_crop_box(rng: np.random.Generator, height: int, width: int,
                     min_scale: float, max_scale: float = 1.0) -> tuple[int, int, int, int]:
    """(top, left, height, width) of RandomResizedCrop: area fraction uniform in
    (min_scale, max_scale), aspect ratio log-uniform in RATIO_RANGE, retried until the box
    fits, with the centre crop clamped to RATIO_RANGE as the fallback."""
    area = height * width
    log_ratio = (math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1]))
    box = None
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * rng.uniform(min_scale, max_scale)
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
    return box


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
