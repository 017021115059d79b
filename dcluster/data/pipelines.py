"""What every loader (DALI, torchvision) offers the training loop: index lists in,
batches out.

The loop never sees a file path; it hands over global indices in the order it wants them
and gets back tensors tagged with those indices, so a loader can be swapped without touching
the clustering, the sampler or the checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch


@dataclass
class FeatureBatch:
    images: torch.Tensor  # float32 (B, 3, crop, crop), centre crops, normalised
    indices: torch.Tensor  # int64 (B,), global indices, in the order they were asked for


@dataclass
class TrainBatch:
    """The augmented views of a batch's images; no labels: a loss reads its own targets by
    ``indices`` (``labels[batch.indices]``)."""
    # float32 (B, 3, size, size) each, augmented, normalised: one view (crop_size) without
    # data.crops, else sum(count) views, group by group in the declared order
    views: list[torch.Tensor]
    indices: torch.Tensor  # int64 (B,), global indices, following the order given
    # Position in the order just after this batch: pass it as ``start_position`` to resume
    # after this batch (the batch sizes alone do not tell it once bad images are skipped).
    next_position: int

    @property
    def images(self) -> torch.Tensor:
        """The first view (the only one without data.crops)."""
        return self.views[0]


class Pipelines(Protocol):
    """A loader. Images that cannot be read are left out of the batches (so a batch can be
    smaller than ``batch_size``) and recorded in ``bad_indices``; too many raise
    TooManyBadImagesError. The last batch of a pass may be partial; it is kept."""

    bad_indices: dict[int, str]  # global index -> "path: reason", over all passes so far

    def feature_batches(self, indices: Sequence[int], batch_size: int) -> Iterator[FeatureBatch]:
        ...

    def train_batches(self, order: Sequence[int], epoch: int, batch_size: int,
                      start_position: int = 0) -> Iterator[TrainBatch]:
        ...


def num_batches(length: int, batch_size: int, start_position: int = 0) -> int:
    """Batches a pass over ``length`` positions yields from ``start_position`` on (fewer only
    if every image of a batch is unreadable)."""
    return math.ceil(max(length - start_position, 0) / batch_size)


def as_index_array(indices: Sequence[int], size: int, what: str) -> np.ndarray:
    """``indices`` as int64, refused (naming ``what``) unless flat and inside 0..size-1."""
    array = np.asarray(indices, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a flat list of global indices, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= size):
        raise IndexError(f"{what} holds indices outside 0..{size - 1} "
                         f"(min {array.min()}, max {array.max()})")
    return array


def check_train_inputs(order: Sequence[int], start_position: int, size: int) -> np.ndarray:
    """The training order as an int64 array, checked against the ``size`` images of the
    source (and ``start_position`` against it), before a loader spends any time decoding."""
    array = as_index_array(order, size, "training order")
    if not 0 <= start_position <= len(array):
        raise ValueError(f"start_position {start_position} is outside 0..{len(array)}")
    return array
