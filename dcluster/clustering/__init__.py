"""The clustering stage: features -> PCA (whitened) -> L2 -> k-means or PIC -> pseudo-labels.

Preprocessing follows the paper's section 3.4: PCA to 256 dimensions, whitening, L2
normalisation, then FAISS k-means on every point.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from dcluster.clustering.kmeans import run_kmeans
from dcluster.clustering.kmeanspp import kmeanspp_centroids
from dcluster.clustering.pca import Features, PCAStats, as_rows, fit_whitening, l2_normalize
from dcluster.clustering.pic import run_pic
from dcluster.config import ClusteringConfig

log = logging.getLogger(__name__)

__all__ = ["ClusteringResult", "cluster_features", "cluster_reduced", "kmeans_labels",
           "reduce_features"]


@dataclass
class ClusteringResult:
    labels: np.ndarray  # int64 (N,), values in [0, n_clusters)
    n_clusters: int  # k for k-means, number of components for PIC
    objective: float  # k-means loss (sum of squared distances), nan for PIC
    sizes: np.ndarray  # int64 (n_clusters,)
    n_empty: int  # clusters with no point
    n_reseeded: int  # empty-cluster re-seeds by splitting during k-means
    backend: str  # e.g. "faiss-cpu", "faiss-gpu x4 (replicated)", "pic-cpu"
    pca_seconds: float
    cluster_seconds: float
    features: np.ndarray  # float32 (N, pca_dim): the whitened, L2-normalised vectors clustered


def reduce_features(features: Features, cfg: ClusteringConfig) -> np.ndarray:
    """PCA (to ``cfg.pca_dim``, 0 keeping all dimensions), whitening if ``cfg.whiten``, then
    L2 normalisation if ``cfg.l2_normalize``; a new float32 (N, dim) array."""
    x = as_rows(features)
    stats = PCAStats(x.shape[1]).update(x)
    transform = fit_whitening(stats, cfg.pca_dim or x.shape[1], whiten=cfg.whiten)
    reduced = transform.apply(x)
    return l2_normalize(reduced) if cfg.l2_normalize else reduced


def cluster_features(features: Features, cfg: ClusteringConfig, seed: int) -> ClusteringResult:
    """Pseudo-labels for ``features`` (N, D) per ``cfg``; ``seed`` seeds k-means (pass a
    different one each epoch)."""
    start = time.perf_counter()
    x = reduce_features(features, cfg)
    return cluster_reduced(x, cfg, seed, pca_seconds=time.perf_counter() - start)


def cluster_reduced(x: np.ndarray, cfg: ClusteringConfig, seed: int,
                    pca_seconds: float = 0.0) -> ClusteringResult:
    """The clustering half of :func:`cluster_features`, on vectors already reduced (as
    :func:`reduce_features` does): the distributed stage reduces on every rank and clusters
    the gathered vectors on rank 0."""
    start = time.perf_counter()
    if cfg.method == "kmeans":
        km = run_kmeans(x, cfg.k, seed=seed, niter=cfg.niter,
                        max_points_per_centroid=cfg.max_points_per_centroid, device=cfg.device)
        labels, n_clusters, objective, sizes = km.labels, cfg.k, km.objective, km.sizes
        n_empty, n_reseeded, backend = km.n_empty, km.n_reseeded, km.backend
    elif cfg.method == "pic":
        pic = run_pic(x, sigma=cfg.pic.sigma, alpha=cfg.pic.alpha, knn=cfg.pic.knn,
                      iterations=cfg.pic.iterations, device=cfg.device)
        labels, n_clusters, objective, sizes = pic.labels, pic.n_clusters, float("nan"), pic.sizes
        n_empty, n_reseeded, backend = 0, 0, pic.backend
    else:
        raise ValueError(f"unknown clustering method {cfg.method!r} (expected kmeans or pic)")
    cluster_seconds = time.perf_counter() - start
    log.info("clustered %d points into %d clusters on %s (%d empty, %d re-seeded); "
             "PCA %.2f s, clustering %.2f s", x.shape[0], n_clusters, backend, n_empty,
             n_reseeded, pca_seconds, cluster_seconds)
    return ClusteringResult(labels=labels, n_clusters=n_clusters, objective=objective,
                            sizes=sizes, n_empty=n_empty, n_reseeded=n_reseeded,
                            backend=backend, pca_seconds=pca_seconds,
                            cluster_seconds=cluster_seconds, features=x)


def kmeans_labels(x: np.ndarray, k: int, seed: int, niter: int = 20,
                  device: str = "auto", plus_plus: bool = False) -> np.ndarray:
    """k-means labels of already prepared vectors (e.g. ``ClusteringResult.features`` with k =
    the number of true classes, for evaluation); trains on every point. ``plus_plus`` seeds
    with k-means++ instead of random points (for few, tight clusters: see kmeanspp.py)."""
    init = kmeanspp_centroids(x, k, np.random.default_rng(seed)) if plus_plus else None
    return run_kmeans(x, k, seed=seed, niter=niter, device=device, init=init).labels
