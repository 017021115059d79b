"""Images by global index: the only package that knows where the bytes live.

``open_source`` scans the image folder, ``build_pipelines`` picks the loader that turns
lists of global indices into batches.
"""
from __future__ import annotations

import logging
from typing import Callable

from dcluster.config import DataConfig
from dcluster.data.badfiles import TooManyBadImagesError
from dcluster.data.decode import BadImageError, decode_rgb
from dcluster.data.pipelines import FeatureBatch, Pipelines, TrainBatch, num_batches
from dcluster.data.source import DataSourceError, FolderSource, open_source
from dcluster.data.torchvision_loader import TorchvisionPipelines

log = logging.getLogger("dcluster.data")

_LOADERS: dict[str, Callable[[FolderSource, DataConfig, int], Pipelines]] = {
    "torchvision": TorchvisionPipelines,
}


def build_pipelines(source: FolderSource, data_cfg: DataConfig, seed: int) -> Pipelines:
    if data_cfg.loader not in _LOADERS:
        raise ValueError(f"unknown data.loader {data_cfg.loader!r}; "
                         f"available: {', '.join(sorted(_LOADERS))}")
    log.info("data loader: %s, %d workers", data_cfg.loader, data_cfg.workers)
    return _LOADERS[data_cfg.loader](source, data_cfg, seed)


__all__ = [
    "BadImageError", "DataSourceError", "FeatureBatch", "FolderSource", "Pipelines",
    "TooManyBadImagesError", "TorchvisionPipelines", "TrainBatch", "build_pipelines",
    "decode_rgb", "num_batches", "open_source",
]
