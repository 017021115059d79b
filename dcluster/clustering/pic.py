"""Power Iteration Clustering, the variant of the paper's appendix 2.1.

A k-nearest-neighbour graph with Gaussian weights is smoothed by a few regularised power
iterations; every node then points to the neighbour that increases the resulting score v the
most (weighted by the edge), and the clusters are the trees of that forest. The number of
clusters is an output, driven by the bandwidth sigma.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from dcluster.clustering.kmeans import as_points, flat_l2_index, resolve_gpus

log = logging.getLogger(__name__)


@dataclass
class PICResult:
    labels: np.ndarray  # int64 (N,), values in [0, n_clusters)
    n_clusters: int
    sizes: np.ndarray  # int64 (n_clusters,)
    backend: str


def knn_graph(x: np.ndarray, knn: int, ngpu: int) -> sp.csr_matrix:
    """G with G[i, j] = squared distance for the ``knn`` nearest neighbours j != i of i.

    Self is removed by id, not by position: with duplicate points FAISS may rank a twin before
    the point itself, and when self is missing from the list the farthest hit is dropped."""
    n = x.shape[0]
    if n <= knn:
        raise ValueError(f"PIC with knn={knn} needs more than {knn} points, got {n}")
    index = flat_l2_index(x.shape[1], ngpu)
    index.add(x)
    dist, ids = index.search(x, knn + 1)
    drop = ids == np.arange(n)[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    cols = ids[keep].reshape(n, knn)
    vals = np.maximum(dist[keep].reshape(n, knn), 0.0)  # float32 rounding can go below 0
    rows = np.repeat(np.arange(n), knn)
    return sp.csr_matrix((vals.ravel().astype(np.float64), (rows, cols.ravel())), shape=(n, n))


def power_iteration(a: sp.csr_matrix, alpha: float, iterations: int) -> np.ndarray:
    """v <- N1(alpha A v + (1 - alpha) v) from the uniform vector (A = G + G^T).

    float64: with alpha = 1e-3 the entries of v differ from 1/n by about alpha times the
    weighted degree, a relative spread float32 would blur."""
    n = a.shape[0]
    v = np.full(n, 1.0 / n)
    for _ in range(iterations):
        v = alpha * (a @ v) + (1.0 - alpha) * v
        v /= np.abs(v).sum()
    return v


def steepest_ascent(a: sp.csr_matrix, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges i -> argmax_j a_ij (v_j - v_i) over the neighbours j of i in A; none from local
    maxima (no neighbour with a positive gain). Ties go to the lowest column index."""
    n = a.shape[0]
    rows = np.repeat(np.arange(n), np.diff(a.indptr))
    gain = a.data * (v[a.indices] - v[rows])
    order = np.lexsort((a.indices, -gain, rows))  # per row: best gain first
    starts = a.indptr[:-1][np.diff(a.indptr) > 0]
    best = order[starts]
    ascending = gain[best] > 0
    return rows[best][ascending], a.indices[best][ascending]


def run_pic(x: np.ndarray, *, sigma: float, alpha: float, knn: int, iterations: int,
            device: str = "auto") -> PICResult:
    """Cluster the rows of ``x`` (L2-normalised features) by PIC.

    Edge weights are w_ij = exp(-||x_i - x_j||^2 / sigma^2). The ascent uses the entries of
    G + G^T, so a pair that are each other's neighbours counts twice, as in the reference
    DeepCluster implementation."""
    if sigma <= 0 or not 0 < alpha < 1 or knn < 1 or iterations < 1:
        raise ValueError(f"invalid PIC parameters: sigma={sigma} (> 0), alpha={alpha} (in (0, 1)), "
                         f"knn={knn} (>= 1), iterations={iterations} (>= 1)")
    x = as_points(x)
    n = x.shape[0]
    ngpu = resolve_gpus(device)
    backend = f"pic-gpu x{ngpu}" if ngpu else "pic-cpu"
    log.info("PIC on %s: %d points, knn=%d, sigma=%g, %d iterations",
             backend, n, knn, sigma, iterations)
    g = knn_graph(x, knn, ngpu)
    g.data = np.exp(-g.data / sigma**2)
    a = (g + g.T).tocsr()
    v = power_iteration(a, alpha, iterations)
    src, dst = steepest_ascent(a, v)
    forest = sp.csr_matrix((np.ones(src.size), (src, dst)), shape=(n, n))
    n_clusters, labels = connected_components(forest, directed=True, connection="weak")
    labels = labels.astype(np.int64)
    log.info("PIC found %d clusters", n_clusters)
    return PICResult(labels=labels, n_clusters=int(n_clusters),
                     sizes=np.bincount(labels, minlength=n_clusters), backend=backend)
