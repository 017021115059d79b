"""The torchvision loader's per-sample transforms (Pillow and torchvision's functional
ops), with the crop windows of dcluster/data/crops.py: the same augmentations as DALI's."""
from __future__ import annotations

from typing import Protocol

import torch
import torchvision.transforms.functional as F
from PIL import Image

from dcluster.data.crops import (Augmentation, center_crop_origin, normalization,
                                 resized_shorter_side, sample_generator)


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
    """The ``augmentation``'s rotation of the whole image, then its crop window resized to
    ``crop_size``, then its horizontal flip."""

    def __init__(self, crop_size: int, augmentation: Augmentation, seed: int, epoch: int,
                 grayscale_stats: bool = False) -> None:
        super().__init__(grayscale_stats)
        self.crop_size = crop_size
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = epoch

    def __call__(self, image: Image.Image, position: int, index: int) -> torch.Tensor:
        rng = sample_generator(self.seed, self.epoch, position, index)
        p = self.augmentation.sample(rng, image.height, image.width)
        if p.angle:
            image = F.rotate(image, p.angle, interpolation=F.InterpolationMode.BILINEAR, fill=0)
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
