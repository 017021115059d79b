"""The balanced sampler of the paper's section 3.3, split across distributed ranks.

Images are drawn uniformly over the pseudo-labels rather than over images, so a few huge
clusters cannot dominate training (the "trivial parametrization" failure). The order is a pure
function of (labels, seed, epoch): every rank computes the same global list without
communicating, and a resumed epoch replays exactly the order it was interrupted in.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def balanced_order(labels: np.ndarray, seed: int, epoch: int,
                   num_samples: Optional[int] = None) -> np.ndarray:
    """A shuffled global list of ``num_samples`` image indices (int64), uniform over clusters.

    Every non-empty cluster gets ceil(num_samples / n_clusters) draws, or one fewer: the
    surplus of the ceiling is removed one draw each from distinct, randomly chosen clusters
    (rather than by cutting the shuffled list, which could take several draws from one cluster)
    so per-cluster counts differ by at most one. A cluster draws without replacement when it
    has enough images and with replacement only when it is smaller than its quota. Labels < 0
    mark excluded (unreadable) images, which are never drawn. ``num_samples`` defaults to the
    number of labelled images.
    """
    labels = np.asarray(labels).ravel()
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    valid = np.flatnonzero(labels >= 0)
    if valid.size == 0:
        raise ValueError(f"no labelled image to sample from (all {labels.size} labels are < 0)")
    if num_samples is None:
        num_samples = int(valid.size)
    if num_samples < 0:
        raise ValueError(f"num_samples must not be negative, got {num_samples}")
    rng = np.random.default_rng([seed, epoch])

    # members grouped by cluster, in random order within each cluster
    members = valid[np.lexsort((rng.random(valid.size), labels[valid]))]
    _, sizes = np.unique(labels[valid], return_counts=True)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    n_clusters = sizes.size

    quota = np.full(n_clusters, -(-num_samples // n_clusters), dtype=np.int64)
    quota[rng.choice(n_clusters, int(quota.sum()) - num_samples, replace=False)] -= 1

    cluster = np.repeat(np.arange(n_clusters), quota)
    rank_in_cluster = np.arange(num_samples) - np.repeat(np.cumsum(quota) - quota, quota)
    size = sizes[cluster]
    with_replacement = rng.integers(0, size)
    offset = np.where(size >= quota[cluster], rank_in_cluster, with_replacement)
    order = members[starts[cluster] + offset]
    rng.shuffle(order)
    return order.astype(np.int64, copy=False)


def rank_slice(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s share of the global ``order``: every world_size-th entry from ``rank``.

    The list is first cut to a multiple of world_size (dropping at most world_size - 1 entries
    at its end) so that every rank runs the same number of steps, since a rank with an extra
    batch would block the others' collectives. Strided rather than contiguous shares mean that
    after s steps of batch b the ranks together have consumed exactly the first s * b *
    world_size entries of the global list, whatever the world size.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    usable = len(order) - len(order) % world_size
    return np.ascontiguousarray(order[rank:usable:world_size])
