"""Frozen features of a split, each process computing its share, gathered on rank 0.

The split's sorted index list is cut into contiguous shards (distributed.shard_bounds, as
training cuts the data set), each rank runs the feature pass of dcluster/runtime/extract.py on its
own, and rank 0 receives the rows in rank order, which is global-index order. In a single
process every collective is the identity.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from dcluster.parallel.collectives import Comm
from dcluster.parallel.distributed import Env, shard_bounds
from dcluster.evaluation.splits import Split
from dcluster.runtime.extract import extract_features


def split_features(model: nn.Module, split: Split, batch_size: int, env: Env, comm: Comm,
                   progress_mode: str,
                   compute: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                   ) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """On rank 0, (features float32 (n, D), labels int64 (n,)) of the split's readable images
    (unreadable ones left out), rows by increasing global index; None on the other ranks."""
    rows = split_rows(model, split, batch_size, env, comm, progress_mode, compute)
    if rows is None:
        return None
    features, indices = rows
    return features, split.source.targets[indices]


def split_rows(model: nn.Module, split: Split, batch_size: int, env: Env, comm: Comm,
               progress_mode: str,
               compute: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
               ) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """:func:`split_features` with the rows' global indices in place of their labels."""
    bounds = shard_bounds(len(split.indices), env.world_size)
    mine = split.indices[bounds[env.rank]:bounds[env.rank + 1]]
    shard = extract_features(model, split.pipelines, mine, batch_size, env.device, progress_mode,
                             env.is_main, compute=compute)
    counts = comm.all_gather_object(len(shard.indices))
    features = comm.gather_rows(shard.features, counts)
    indices = comm.gather_rows(shard.indices, counts)
    if features is None:
        return None
    return features, indices
