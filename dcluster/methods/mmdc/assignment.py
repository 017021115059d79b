"""The two ways MMDC decides which target an image is pulled to.

Main stage (paper section III.A, after Noise As Targets): within each mini-batch, the batch's
own targets are permuted among its images so that the total Euclidean distance between the
centre-crop embeddings and their targets is minimal (the Hungarian method). A batch only trades
targets among its images, so the targets stay a permutation of the drawn points, and batches
that are disjoint (across steps, or across ranks) never touch the same entry.

Refinement stage (section III.E): k-means on the embeddings decides the clusters; its arbitrary
cluster numbers are matched to the components the images were pulled to before, so that the
targets move as little as the new partition allows.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from dcluster.parallel.collectives import Comm


def best_permutation(embeddings: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``perm`` minimising sum_r ||embeddings[r] - points[perm[r]]||: row r takes the target
    now held by row perm[r]."""
    if embeddings.shape != points.shape:
        raise ValueError(f"{len(embeddings)} embeddings of shape {embeddings.shape[1:]} cannot be "
                         f"matched to targets of shape {points.shape}")
    rows, cols = linear_sum_assignment(cdist(embeddings, points))
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def match_labels(new: np.ndarray, previous: np.ndarray, k: int) -> np.ndarray:
    """``new`` (values 0..k-1) renumbered by the one-to-one map that keeps the most images on
    the label they had in ``previous`` (values 0..k-1)."""
    overlap = np.zeros((k, k), dtype=np.int64)
    np.add.at(overlap, (new, previous), 1)
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    mapping = np.empty(k, dtype=np.int64)
    mapping[rows] = cols
    return mapping[new]


def merge_owned(values: np.ndarray, owned: Sequence[np.ndarray], comm: Comm) -> np.ndarray:
    """Every rank's ``values`` (int64 (N,), in place) made equal: rank r alone has changed the
    entries ``owned[r]`` (disjoint across ranks, as the images of the ranks' slices of one
    permutation are), and each rank sends its own entries to all others."""
    for rank, indices in enumerate(owned):
        part = comm.broadcast(np.ascontiguousarray(values[indices]), src=rank)
        values[indices] = part
    return values
