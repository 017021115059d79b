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

import numpy as np
import torch

SEEDING_POINTS_PER_CENTROID = 64  # seeds are drawn from a random subset of k * 64 points


def kmeanspp_centroids(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (k, d) initial centroids drawn from the rows of ``x`` (N, d)."""
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means++ needs 1 <= k <= number of points, got k={k} for {len(x)}")
    limit = k * SEEDING_POINTS_PER_CENTROID
    rows = rng.choice(len(x), limit, replace=False) if len(x) > limit else np.arange(len(x))
    points = torch.from_numpy(np.ascontiguousarray(x[rows], dtype=np.float32))
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
