"""The torchvision loader's per-sample transforms (Pillow and torchvision's functional
ops), with the crop windows of dcluster/data/crops.py: the same augmentations as DALI's."""
from __future__ import annotations

from typing import Optional, Protocol, Sequence, Union

import torch
import torchvision.transforms.functional as F
from PIL import Image

from dcluster.data.crops import (Augmentation, View, center_crop_origin, normalization,
                                 resized_shorter_side, sample_generator)


class SampleTransform(Protocol):
    """Image to normalised tensor (a tuple of them: one per view, for multi-crop);
    ``position`` and ``index`` key any randomness."""

    def __call__(self, image: Image.Image, position: int,
                 index: int) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]: ...


class _Normalize:
    def __init__(self, grayscale_stats: bool) -> None:
        mean, std = normalization(grayscale_stats)
        self.mean, self.std = list(mean), list(std)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        return F.normalize(F.to_tensor(image), self.mean, self.std)


class TrainTransform(_Normalize):
    """The ``augmentation``'s rotation of the whole image, then its crop window resized to
    ``crop_size``, then its horizontal flip; ``view`` (multi-crop) keys the draws of one view."""

    def __init__(self, crop_size: int, augmentation: Augmentation, seed: int, epoch: int,
                 grayscale_stats: bool = False, view: Optional[int] = None) -> None:
        super().__init__(grayscale_stats)
        self.crop_size = crop_size
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = epoch
        self.view = view

    def __call__(self, image: Image.Image, position: int, index: int) -> torch.Tensor:
        rng = sample_generator(self.seed, self.epoch, position, index, self.view)
        p = self.augmentation.sample(rng, image.height, image.width)
        if p.angle:
            image = F.rotate(image, p.angle, interpolation=F.InterpolationMode.BILINEAR, fill=0)
        image = F.resized_crop(image, p.top, p.left, p.height, p.width,
                               [self.crop_size, self.crop_size],
                               interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        if p.flip:
            image = F.hflip(image)
        return self.to_tensor(image)


class MultiViewTransform:
    """Multi-crop (``data.crops``): one TrainTransform per view, each keyed by its number."""

    def __init__(self, views: Sequence[View], seed: int, epoch: int,
                 grayscale_stats: bool = False) -> None:
        self.views = [TrainTransform(v.size, v.augmentation, seed, epoch, grayscale_stats,
                                     v.number) for v in views]

    def __call__(self, image: Image.Image, position: int, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(view(image, position, index) for view in self.views)


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
