"""Greedy k-means++ seeding (Arthur & Vassilvitskii, 2007; the variant scikit-learn uses) for
FAISS k-means.

FAISS seeds k-means with k random points. That suits DeepCluster's k = 10,000 over-clustering,
but scoring features by k-means with k = the number of classes (`dcluster eval clusters`,
MMDC's refinement stage) meets few, tight, well separated groups, where random seeds often put
two centroids in one group and none in another, and Lloyd's iterations cannot repair it: the
score would measure the seeding, not the features. k-means++ draws each next seed with
probability proportional to the squared distance to the nearest seed so far; the greedy
variant draws 2 + log(k) candidates and keeps the one that lowers the potential most, which
makes a missed group rare rather than merely unlikely.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from dcluster.parallel.collectives import Comm

SEEDING_POINTS_PER_CENTROID = 64  # seeds are drawn from a random subset of k * 64 points


def seeding_sample(total: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """The positions (in draw order) of the rows the seeds are drawn from: a random
    k * SEEDING_POINTS_PER_CENTROID of ``total``, or all of them when there are not more."""
    if not 1 <= k <= total:
        raise ValueError(f"k-means++ needs 1 <= k <= number of points, got k={k} for {total}")
    limit = k * SEEDING_POINTS_PER_CENTROID
    return rng.choice(total, limit, replace=False) if total > limit else np.arange(total)


def kmeanspp_centroids(x: np.ndarray, k: int, rng: np.random.Generator,
                       comm: Optional[Comm] = None) -> np.ndarray:
    """float32 (k, d) initial centroids drawn from the rows of ``x`` (N, d); with ``comm``,
    from the union of every rank's rows (numbered in rank order), the same on every rank and
    the same as one process drawing from all of them. Only the seeding sample (at most
    k * SEEDING_POINTS_PER_CENTROID rows, whatever N is) is gathered, on rank 0, which draws
    the seeds and broadcasts them."""
    counts = [len(x)] if comm is None else comm.all_gather_object(len(x))
    drawn = seeding_sample(sum(counts), k, rng)
    ascending = np.sort(drawn)
    starts = np.concatenate(([0], np.cumsum(counts)))
    per_rank = np.diff(np.searchsorted(ascending, starts)).tolist()
    rank = 0 if comm is None else comm.rank
    mine = ascending[(ascending >= starts[rank]) & (ascending < starts[rank + 1])] - starts[rank]
    rows = np.ascontiguousarray(x[mine], dtype=np.float32)
    sample = rows if comm is None else comm.gather_rows(rows, per_rank)
    centroids = np.empty((k, x.shape[1]), dtype=np.float32)
    if sample is not None:  # rank 0: the rows back in draw order, as one process draws them
        centroids[...] = greedy_seeds(sample[np.searchsorted(ascending, drawn)], k, rng)
    return centroids if comm is None else comm.broadcast(centroids)


def greedy_seeds(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The greedy k-means++ draw of k of ``points`` (float32 (n, d), n >= k)."""
    points = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    trials = 2 + int(math.log(k))
    chosen = [int(rng.integers(len(points)))]
    d2 = torch.cdist(points, points[chosen]).double().square().squeeze(1)
    for _ in range(1, k):
        total = float(d2.sum())
        # when every point coincides with a seed, any point is as good as another
        p = (d2 / total).numpy() if total > 0 else None
        candidates = rng.choice(len(points), trials, p=p)
        to_candidates = torch.cdist(points, points[candidates]).double().square()
        potentials = torch.minimum(d2[:, None], to_candidates)
        best = int(potentials.sum(0).argmin())
        chosen.append(int(candidates[best]))
        d2 = potentials[:, best]
    return points[chosen].numpy()
