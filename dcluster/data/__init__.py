"""Images by global index: the only package that knows where the bytes live.

``open_source`` opens the image folder or tar shards, ``build_pipelines`` picks the loader
that turns lists of global indices into batches.
"""
from __future__ import annotations

import logging
from typing import Callable

from dcluster.core.config import ConfigError, DataConfig
from dcluster.data.badfiles import TooManyBadImagesError
from dcluster.data.decode import BadImageError, decode_rgb
from dcluster.data.pipelines import FeatureBatch, Pipelines, TrainBatch, num_batches
from dcluster.data.shards import TarShardSource, is_shard_dir
from dcluster.data.source import DataSourceError, FolderSource, ImageSource

log = logging.getLogger("dcluster.data")


def open_source(data_cfg: DataConfig) -> ImageSource:
    """The source ``data.source`` names; ``auto`` takes a folder holding ``.tar`` files at its
    top level for tar shards and anything else for an image folder tree. Here rather than in
    source.py, which shards.py builds on: the factory needs both kinds."""
    kind = data_cfg.source
    if kind == "auto":
        kind = "shards" if is_shard_dir(data_cfg.path) else "folder"
    if kind == "shards":
        return TarShardSource(data_cfg.path)
    if kind == "folder":
        return FolderSource(data_cfg.path)
    raise ValueError(f"unknown data.source {data_cfg.source!r}; available: auto, folder, shards")


def _dali(source: ImageSource, data_cfg: DataConfig, seed: int) -> Pipelines:
    """Imported on use, so that the torchvision fallback works where DALI is not installed."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"config key 'data.loader' = 'dali': NVIDIA DALI cannot be imported ({err}); "
            f"install it (pip install nvidia-dali-cuda130) or set data.loader=torchvision"
        ) from None
    from dcluster.data.dali_loader import DaliPipelines

    return DaliPipelines(source, data_cfg, seed)


def _torchvision(source: ImageSource, data_cfg: DataConfig, seed: int) -> Pipelines:
    """Imported on use: torchvision adds about 3 s to the start of every process."""
    from dcluster.data.torchvision_loader import TorchvisionPipelines

    return TorchvisionPipelines(source, data_cfg, seed)


# each imported on use: every process loads one of them only
_LOADERS: dict[str, Callable[[ImageSource, DataConfig, int], Pipelines]] = {
    "dali": _dali,
    "torchvision": _torchvision,
}


def build_pipelines(source: ImageSource, data_cfg: DataConfig, seed: int) -> Pipelines:
    if data_cfg.loader not in _LOADERS:
        raise ValueError(f"unknown data.loader {data_cfg.loader!r}; "
                         f"available: {', '.join(sorted(_LOADERS))}")
    log.info("data loader: %s, %d workers", data_cfg.loader, data_cfg.workers)
    return _LOADERS[data_cfg.loader](source, data_cfg, seed)


__all__ = [
    "BadImageError", "DataSourceError", "FeatureBatch", "FolderSource", "ImageSource",
    "Pipelines", "TarShardSource", "TooManyBadImagesError",
    "TrainBatch", "build_pipelines", "decode_rgb", "num_batches", "open_source",
]
