"""k-means over points spread across ranks, none of which holds more than its own shard.

For YFCC100M-scale runs, where the N x 256 float32 vectors (100 GB at N = 100M) fit no single
host. Lloyd's iterations: every rank assigns its points to the current centroids with FAISS
(its own GPU, or the CPU), sums them per cluster, and one all-reduce of the per-cluster sums,
counts and the objective gives every rank the same totals; each rank then computes the same
new centroids. Everything random (the initial sample, the re-seeding of empty clusters) comes
from one generator seeded identically on every rank and fed only all-reduced values, so the
centroids never diverge between ranks and nothing but k x (d + 1) numbers moves per
iteration.

Empty clusters are re-seeded as FAISS does (and the paper's section 3.3 asks): split a
non-empty cluster chosen with probability proportional to (size - 1), giving the empty one a
copy of its centroid, and push the two apart by a small symmetric perturbation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import faiss
import numpy as np
import torch

from dcluster.clustering.kmeans import as_points
from dcluster.collectives import Comm

log = logging.getLogger(__name__)

SPLIT_EPS = 1.0 / 1024.0
"""Relative size of the symmetric perturbation that separates two halves of a split cluster
(FAISS's value)."""

CHUNK_ROWS = 16384
"""Points assigned and summed at a time: bounds the float64 copy and FAISS's result buffers."""


@dataclass
class ShardedKMeansResult:
    labels: np.ndarray  # int64 (n_local,): nearest final centroid of this rank's points
    objective: float  # sum over ALL ranks' points of the squared distance to their final centroid
    sizes: np.ndarray  # int64 (k,), over all ranks
    n_empty: int  # clusters no point is assigned to in the final assignment
    n_reseeded: int  # empty clusters re-seeded by splitting, over all iterations
    centroids: np.ndarray  # float32 (k, d), identical on every rank
    backend: str


def assignment_index(d: int, gpu: Optional[int]) -> faiss.Index:
    """An exact L2 index for this rank's assignments: on its own GPU ``gpu`` (each rank
    assigns only its shard, so there is no point replicating across the node's GPUs as the
    gather path does), or on the CPU. float16 is off so GPU and CPU assignments agree."""
    index = faiss.IndexFlatL2(d)
    if gpu is None:
        return index
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = False
    gpu_index = faiss.index_cpu_to_gpu(resources, gpu, index, options)
    gpu_index.referenced_objects = [resources]  # the index must not outlive its resources
    return gpu_index


def sharded_kmeans(x: np.ndarray, k: int, *, seed: int, niter: int, comm: Comm,
                   gpu: Optional[int] = None) -> ShardedKMeansResult:
    """Cluster the union of every rank's rows ``x`` (float32 (n_local, d), n_local may be 0)
    into ``k`` groups; call on every rank with the same ``k``, ``seed`` and ``niter``."""
    d = x.shape[1]
    x = as_points(x) if x.shape[0] else np.empty((0, d), dtype=np.float32)
    counts = comm.all_gather_object(x.shape[0])
    total = int(sum(counts))
    if not 1 <= k <= total:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {total} points")
    if niter < 1:
        raise ValueError(f"k-means needs at least one iteration, got niter={niter}")
    rng = np.random.default_rng(seed)
    offset = int(sum(counts[: comm.rank]))
    centroids = initial_centroids(x, offset, total, k, rng, comm)
    index = assignment_index(d, gpu)
    backend = f"sharded faiss-{'gpu' if gpu is not None else 'cpu'} over {comm.world_size} rank(s)"
    log.debug("k-means (%s): %d points x %d dims, k=%d, %d iterations", backend, total, d, k, niter)
    n_reseeded = 0
    for iteration in range(niter):
        totals = comm.all_reduce_sum(cluster_sums(x, centroids, index))
        sizes = totals[:k, d].astype(np.int64)
        centroids = (totals[:k, :d] / np.maximum(sizes, 1)[:, None]).astype(np.float32)
        n_reseeded += split_empty_clusters(centroids, sizes, rng)
        log.debug("iteration %d: objective %.6g", iteration, totals[k, 0])
    labels, objective = assign(x, centroids, index)
    sizes = comm.all_reduce_sum(np.bincount(labels, minlength=k).astype(np.int64))
    objective = float(comm.all_reduce_sum(np.array([objective]))[0])
    return ShardedKMeansResult(labels=labels, objective=objective, sizes=sizes,
                               n_empty=int((sizes == 0).sum()), n_reseeded=n_reseeded,
                               centroids=centroids, backend=backend)


def initial_centroids(x: np.ndarray, offset: int, total: int, k: int, rng: np.random.Generator,
                      comm: Comm) -> np.ndarray:
    """k distinct points drawn uniformly from all ranks' points (numbered in rank order; this
    rank's are ``offset .. offset + len(x) - 1``): each rank fills in those it holds, and a sum
    over ranks (of one value and zeros) assembles them exactly."""
    picks = rng.choice(total, size=k, replace=False)
    mine = (picks >= offset) & (picks < offset + x.shape[0])
    centroids = np.zeros((k, x.shape[1]), dtype=np.float32)
    centroids[mine] = x[picks[mine] - offset]
    return comm.all_reduce_sum(centroids)


def cluster_sums(x: np.ndarray, centroids: np.ndarray, index: faiss.Index) -> np.ndarray:
    """This rank's share of one Lloyd step, packed for a single all-reduce: rows 0..k-1 hold
    the float64 sum of the points assigned to each centroid and, in column d, their count;
    row k column 0 holds the sum of squared distances (the objective before the update)."""
    k, d = centroids.shape
    packed = np.zeros((k + 1, d + 1), dtype=np.float64)
    sums = torch.from_numpy(packed[:k, :d])
    index.reset()
    index.add(centroids)
    for lo in range(0, x.shape[0], CHUNK_ROWS):
        chunk = x[lo: lo + CHUNK_ROWS]
        distances, assigned = index.search(chunk, 1)
        labels = torch.from_numpy(assigned.ravel())
        sums.index_add_(0, labels, torch.from_numpy(chunk).double())
        packed[:k, d] += np.bincount(assigned.ravel(), minlength=k)
        packed[k, 0] += distances.sum(dtype=np.float64)
    return packed


def assign(x: np.ndarray, centroids: np.ndarray, index: faiss.Index) -> tuple[np.ndarray, float]:
    """Nearest centroid of each local point (int64) and the local sum of squared distances."""
    index.reset()
    index.add(centroids)
    labels = np.empty(x.shape[0], dtype=np.int64)
    objective = 0.0
    for lo in range(0, x.shape[0], CHUNK_ROWS):
        distances, assigned = index.search(x[lo: lo + CHUNK_ROWS], 1)
        labels[lo: lo + assigned.shape[0]] = assigned.ravel()
        objective += float(distances.sum(dtype=np.float64))
    return labels, objective


def split_empty_clusters(centroids: np.ndarray, sizes: np.ndarray,
                         rng: np.random.Generator) -> int:
    """Re-seed every empty cluster from a split of a large one, in place; returns how many.

    The cluster to split is drawn with probability proportional to (size - 1), so singletons
    are never split and large clusters most often; the two halves then count as half the
    points each for later draws (FAISS's rule). Deterministic given the inputs and ``rng``."""
    sizes = sizes.astype(np.float64)
    empty = np.flatnonzero(sizes == 0)
    for ci in empty:
        weights = np.maximum(sizes - 1.0, 0.0)
        cj = rng.choice(sizes.size, p=weights / weights.sum())
        centroids[ci] = centroids[cj]
        sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
        centroids[ci] *= (1.0 + sign * SPLIT_EPS).astype(np.float32)
        centroids[cj] *= (1.0 - sign * SPLIT_EPS).astype(np.float32)
        sizes[ci] = sizes[cj] // 2
        sizes[cj] -= sizes[ci]
    return int(empty.size)
