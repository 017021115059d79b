"""The PIL/torchvision loader: a DataLoader over positions of an index list.

The Dataset is indexed by position in the list it was given, not by global index, and read
sequentially, so batches follow the list exactly (repeats included) whatever the number of
workers. Workers never raise on a bad image: they hand back a marker and the main process,
which alone sees the whole pass, does the counting.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dcluster.core.config import DataConfig
from dcluster.data.badfiles import BadImageBudget, Unreadable, load_or_unreadable
from dcluster.data.crops import training_views
from dcluster.data.decode import decode_rgb
from dcluster.data.pipelines import FeatureBatch, TrainBatch, as_index_array, check_train_inputs
from dcluster.data.source import ImageSource
from dcluster.data.transforms import (FeatureTransform, MultiViewTransform, SampleTransform,
                                      TrainTransform)


class _Decoded(NamedTuple):
    index: int
    image: Union[torch.Tensor, tuple[torch.Tensor, ...]]  # a tuple: one tensor per view


_Sample = Union[_Decoded, Unreadable]


class _PositionDataset(Dataset):
    """Item ``i`` is the image at position ``start + i`` of ``indices``."""

    def __init__(self, source: ImageSource, indices: np.ndarray, start: int,
                 transform: SampleTransform) -> None:
        self.source = source
        self.indices = indices
        self.start = start
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices) - self.start

    def __getitem__(self, item: int) -> _Sample:
        position = self.start + item
        index = int(self.indices[position])
        image = load_or_unreadable(self.source, index, decode_rgb)
        if isinstance(image, Unreadable):
            return image
        return _Decoded(index, self.transform(image, position, index))


class _Collated(NamedTuple):
    views: list[torch.Tensor]  # one (B, 3, size, size) per view; one view but multi-crop
    indices: torch.Tensor
    unreadable: list[Unreadable]
    positions: int  # how many positions of the list this batch covers, readable or not

    @property
    def images(self) -> torch.Tensor:
        return self.views[0]


def _collate(samples: list[_Sample]) -> _Collated:
    decoded = [s for s in samples if isinstance(s, _Decoded)]
    if not decoded:
        views = [torch.empty(0, 3, 0, 0)]
    elif isinstance(decoded[0].image, tuple):
        views = [torch.stack([s.image[view] for s in decoded])
                 for view in range(len(decoded[0].image))]
    else:
        views = [torch.stack([s.image for s in decoded])]
    indices = torch.tensor([s.index for s in decoded], dtype=torch.int64)
    unreadable = [s for s in samples if isinstance(s, Unreadable)]
    return _Collated(views, indices, unreadable, len(samples))


class TorchvisionPipelines:
    """Feature and training passes decoded with PIL in ``data_cfg.workers`` processes."""

    def __init__(self, source: ImageSource, data_cfg: DataConfig, seed: int) -> None:
        self.source = source
        self.cfg = data_cfg
        self.seed = seed
        self.bad_indices: dict[int, str] = {}

    def feature_transform(self) -> FeatureTransform:
        return FeatureTransform(self.cfg.resize_size, self.cfg.crop_size, self.cfg.grayscale_stats)

    def train_transform(self, epoch: int) -> SampleTransform:
        """The one training crop, or with ``data.crops`` every view of an image."""
        views = training_views(self.cfg)
        if self.cfg.crops:
            return MultiViewTransform(views, self.seed, epoch, self.cfg.grayscale_stats)
        (view,) = views
        return TrainTransform(view.size, view.augmentation, self.seed, epoch,
                              self.cfg.grayscale_stats)

    def feature_batches(self, indices: Sequence[int], batch_size: int) -> Iterator[FeatureBatch]:
        array = as_index_array(indices, len(self.source), "feature pass indices")
        for batch in self._batches(array, 0, self.feature_transform(), batch_size):
            yield FeatureBatch(images=batch.images, indices=batch.indices)

    def train_batches(self, order: Sequence[int], epoch: int, batch_size: int,
                      start_position: int = 0) -> Iterator[TrainBatch]:
        """Positions before ``start_position`` are skipped, the others keep the crops they get
        in a full pass."""
        array = check_train_inputs(order, start_position, len(self.source))
        position = start_position
        for batch in self._batches(array, start_position, self.train_transform(epoch),
                                   batch_size):
            position += batch.positions
            yield TrainBatch(views=batch.views, indices=batch.indices, next_position=position)

    def _batches(self, indices: np.ndarray, start: int, transform: SampleTransform,
                 batch_size: int) -> Iterator[_Collated]:
        """Readable images in list order; unreadable ones are charged to the pass's budget."""
        budget = BadImageBudget(len(indices) - start, self.cfg.max_bad_fraction,
                                self.bad_indices)
        for batch in self.data_loader(indices, start, transform, batch_size):
            budget.record_all(batch.unreadable)
            if len(batch.indices):
                yield batch
        budget.log_summary()

    def data_loader(self, indices: np.ndarray, start: int, transform: SampleTransform,
                    batch_size: int, persistent_workers: bool = False) -> DataLoader:
        """The DataLoader of one pass over ``indices`` from ``start``: batches of _Collated in
        list order. A pass builds a new one (its list and transform are the pass's own);
        ``persistent_workers`` keeps the worker processes between iterations of the same
        loader, for a benchmark that repeats one pass (benchmarks/bench_loader.py)."""
        return DataLoader(_PositionDataset(self.source, indices, start, transform),
                          batch_size=batch_size, shuffle=False, drop_last=False,
                          num_workers=self.cfg.workers, collate_fn=_collate,
                          pin_memory=torch.cuda.is_available(),
                          persistent_workers=persistent_workers and self.cfg.workers > 0,
                          # its own generator: a DataLoader otherwise draws its base seed
                          # from the global stream, which dropout uses, so a pass restarted
                          # mid-epoch (resume) would shift the dropout masks that follow
                          generator=torch.Generator())
