"""One k-means engine: Lloyd's iterations over an assignment backend, on one rank or many.

Every k-means of the project runs this loop: the epoch's stage in gather mode (on rank 0, over
the gathered rows, with its node's GPUs), in sharded mode (on every rank over its own rows),
the class probe, MMDC's refinement and ``dcluster eval clusters``. What differs between them
is only where the rows live and what assigns them to centroids, hidden behind an
:class:`~dcluster.clustering.assign.Assigner` (the seam FAISS's ``contrib/clustering.py``
calls ``DatasetAssign``), and which ranks hold rows (``comm``; None for one process).

The loop: k initial centroids drawn from all ranks' rows as FAISS draws them; per iteration every rank
assigns its rows and sums them per cluster, one all-reduce of the k x (d + 1) sums and counts
(and the objective) gives every rank the same totals, and each computes the same new
centroids; it stops early, as FAISS does, when an iteration leaves the objective unchanged.
Empty clusters are re-seeded as FAISS does (``faiss/Clustering.cpp``
``split_clusters``, the paper's section 3.3): a non-empty cluster drawn with probability
proportional to (size - 1) is split, the empty one taking a copy of its centroid, the two
pushed apart by a small symmetric perturbation. Everything random comes from one generator
seeded identically on every rank and fed only all-reduced values, so centroids never diverge
between ranks. The result's objective is that of the final assignment: the sum over all rows
of the squared distance to their final centroid.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from dcluster.core.faiss_after_torch import faiss
from dcluster.clustering.assign import Assigner
from dcluster.core.logs import progress
from dcluster.parallel.collectives import Comm

log = logging.getLogger(__name__)

SPLIT_EPS = 1.0 / 1024.0
"""Relative size of the symmetric perturbation that separates two halves of a split cluster
(FAISS's value)."""


@dataclass
class Clustering:
    """What any clustering of the project returns (k-means of every caller, PIC, the stage)."""
    labels: np.ndarray  # int64: this caller's rows (the stage: all N images, -1 without a row)
    n_clusters: int  # k for k-means, number of components for PIC
    # k-means: sum over ALL ranks' rows of the squared distance to their final centroid
    # (the final assignment's, not FAISS's last loss before the update); nan for PIC
    objective: float
    sizes: np.ndarray  # int64 (n_clusters,), over all ranks
    n_empty: int  # clusters no row is assigned to in the final assignment
    n_reseeded: int  # empty clusters re-seeded by splitting, over all iterations
    backend: str  # which assignment backend ran, e.g. "faiss-cpu", "torch cuda x4"
    centroids: Optional[np.ndarray] = None  # float32 (k, d), the same on every rank
    seconds: float = float("nan")  # wall time of k-means alone (seeding to final assignment)


def lloyd(data: Assigner, k: int, *, niter: int, seed: int, comm: Optional[Comm] = None,
          init: Optional[np.ndarray] = None, sample: int = 0,
          spherical: bool = False) -> Clustering:
    """k-means of the union of every rank's rows (``data``; a rank may hold none) into ``k``
    clusters; with ``comm`` call it on every rank with the same ``k``, ``niter`` and ``seed``.

    ``init`` (k, d) replaces the seeded draw of initial centroids (k-means++ seeds, say);
    ``sample`` > 0 trains on that many rows drawn at random (one process only; FAISS's
    ``max_points_per_centroid``), the final assignment covering every row.

    ``spherical``: spherical k-means of unit rows (DeepCluster-v2's, on L2-normalised
    embeddings): every update ends by scaling each centroid to unit norm (after any split).
    The assignment is left as it is: between unit vectors ||x - c||^2 = 2 - 2 x.c, so the
    nearest centroid in L2 is the one of largest dot product."""
    started = time.perf_counter()
    total = _sum(comm, np.array([data.count()], dtype=np.int64))[0]
    if not 1 <= k <= total:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {total} points")
    if niter < 1:
        raise ValueError(f"k-means needs at least one iteration, got niter={niter}")
    rng = np.random.default_rng(seed)
    train = data
    if 0 < sample < total:
        if comm is not None and comm.world_size > 1:
            raise ValueError("k-means on a sample of the rows runs in one process only")
        log.info("k-means trains on a sample of %d of the %d points", sample, total)
        train = data.subset(np.sort(rng.choice(total, size=sample, replace=False)))
    if init is None:
        centroids = initial_centroids(train, k, seed, comm)
    else:
        centroids = np.ascontiguousarray(init, dtype=np.float32).copy()
        if centroids.shape != (k, data.dim()):
            raise ValueError(f"initial centroids must be ({k}, {data.dim()}), got {centroids.shape}")
    log.debug("k-means on %s: %d points x %d dims, k=%d, %d iterations",
              data.name, total, data.dim(), k, niter)
    n_reseeded, previous = 0, None
    speaks = comm is None or comm.is_main
    for iteration in progress(range(niter), niter, f"k-means (k={k})", "auto", speaks,
                              unit="iterations"):
        step = train.assign_to(centroids, with_sums=True)
        packed = np.zeros((k + 1, data.dim() + 1))
        packed[:k, :-1], packed[:k, -1], packed[k, 0] = step.sums, step.counts, step.objective
        packed = _sum(comm, packed)
        sizes = packed[:k, -1].astype(np.int64)
        centroids = (packed[:k, :-1] / np.maximum(sizes, 1)[:, None]).astype(np.float32)
        split = split_empty_clusters(centroids, sizes, rng)
        n_reseeded += split
        if spherical:
            # a floor for a cluster whose rows cancel out (antipodal pairs): it stays zero
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        log.debug("iteration %d: objective %.6g", iteration, packed[k, 0])
        # converged: the same objective as the last step and no split, so the centroids are
        # (up to ties) a fixed point and later iterations would repeat this one. FAISS stops
        # on the same test (faiss/Clustering.cpp, early_stop_threshold 0); the all-reduced
        # objective is the same on every rank, so all stop together
        if packed[k, 0] == previous and not split:
            break
        previous = packed[k, 0]
    final = data.assign_to(centroids, with_sums=False)
    totals = _sum(comm, np.append(final.counts, final.objective))
    sizes = totals[:k].astype(np.int64)
    return Clustering(labels=final.labels, n_clusters=k, objective=float(totals[k]), sizes=sizes,
                      n_empty=int((sizes == 0).sum()), n_reseeded=n_reseeded,
                      backend=data.name, centroids=centroids,
                      seconds=time.perf_counter() - started)


def _sum(comm: Optional[Comm], array: np.ndarray) -> np.ndarray:
    """``array`` summed over the ranks that hold rows (itself with one process)."""
    return array if comm is None else comm.all_reduce_sum(array)


def initial_centroids(data: Assigner, k: int, seed: int, comm: Optional[Comm]) -> np.ndarray:
    """k distinct rows of all ranks' rows (numbered in rank order): the first k of FAISS's own
    permutation for ``seed`` (``faiss.rand_perm`` with seed + 1, as faiss::Clustering::train
    draws them, faiss/Clustering.cpp), so that a seed picks the centroids `faiss.Kmeans` picked
    in the releases before this engine and their runs resume onto the same clusterings. Each
    rank fills in those it holds, and a sum over ranks (of one value and zeros) assembles
    them exactly."""
    counts = [data.count()] if comm is None else comm.all_gather_object(data.count())
    rank = 0 if comm is None else comm.rank
    offset, total = int(sum(counts[:rank])), int(sum(counts))
    perm = np.empty(total, dtype=np.int32)  # faiss::rand_perm fills an int array
    faiss.rand_perm(faiss.swig_ptr(perm), total, seed % 2**31 + 1)
    picks = perm[:k].astype(np.int64)
    mine = (picks >= offset) & (picks < offset + data.count())
    centroids = np.zeros((k, data.dim()), dtype=np.float32)
    centroids[mine] = data.rows(picks[mine] - offset)
    return _sum(comm, centroids)


def split_empty_clusters(centroids: np.ndarray, sizes: np.ndarray,
                         rng: np.random.Generator) -> int:
    """Re-seed every empty cluster from a split of a large one, in place; returns how many.

    The cluster to split is drawn with probability proportional to (size - 1), so singletons
    are never split and large clusters most often; the two halves then count as half the
    points each for later draws (FAISS's rule). Deterministic given the inputs and ``rng``."""
    sizes = sizes.astype(np.float64)
    empty = np.flatnonzero(sizes == 0)
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
    for ci in empty:
        weights = np.maximum(sizes - 1.0, 0.0)
        cj = rng.choice(sizes.size, p=weights / weights.sum())
        centroids[ci] = centroids[cj]
        centroids[ci] *= (1.0 + sign * SPLIT_EPS).astype(np.float32)
        centroids[cj] *= (1.0 - sign * SPLIT_EPS).astype(np.float32)
        sizes[ci] = sizes[cj] // 2
        sizes[cj] -= sizes[ci]
    return int(empty.size)
