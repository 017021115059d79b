"""Frozen features of a split, each process computing and keeping its own share.

The split's sorted index list is cut into contiguous shards (distributed.shard_bounds, as
training cuts the data set), each rank runs the feature pass of dcluster/runtime/extract.py on its
own and keeps its rows: the protocols work on them where they are (knn.py, clusters.py), so
that no rank ever holds the N x D features of a whole split (21 GB of 4096-d rows at
ImageNet's 1.28M images). In a single process the shard is the whole split.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from dcluster.parallel.distributed import Env, shard_bounds
from dcluster.evaluation.splits import Split
from dcluster.runtime.extract import extract_features


def own_share(indices: np.ndarray, env: Env) -> np.ndarray:
    """This rank's contiguous share of a split's sorted ``indices``."""
    bounds = shard_bounds(len(indices), env.world_size)
    return indices[bounds[env.rank]:bounds[env.rank + 1]]


def shard_features(model: nn.Module, split: Split, batch_size: int, env: Env,
                   progress_mode: str,
                   compute: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (n, D), global indices int64 (n,)) of this rank's share of the
    split's readable images (unreadable ones left out), by increasing global index."""
    shard = extract_features(model, split.pipelines, own_share(split.indices, env), batch_size,
                             env.device, progress_mode, env.is_main, compute=compute)
    return shard.host_features(), shard.indices
