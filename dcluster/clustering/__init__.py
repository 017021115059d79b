"""Clustering of prepared vectors: k-means or PIC -> pseudo-labels.

Preprocessing follows the paper's section 3.4: PCA to 256 dimensions, whitening, L2
normalisation, then FAISS k-means on every point. The epoch's stage, with that preprocessing
across ranks, is :func:`dcluster.clustering.distributed_stage.cluster_shards`; it hands the
reduced vectors to :func:`cluster_reduced` here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from dcluster.clustering.kmeans import run_kmeans
from dcluster.clustering.kmeanspp import kmeanspp_centroids
from dcluster.clustering.pic import run_pic
from dcluster.config import ClusteringConfig

log = logging.getLogger(__name__)

__all__ = ["ClusteringResult", "cluster_reduced", "kmeans_labels"]


@dataclass
class ClusteringResult:
    labels: np.ndarray  # int64 (N,), values in [0, n_clusters)
    n_clusters: int  # k for k-means, number of components for PIC
    objective: float  # k-means: sum of squared distances of the final assignment, nan for PIC
    sizes: np.ndarray  # int64 (n_clusters,)
    n_empty: int  # clusters with no point
    n_reseeded: int  # empty-cluster re-seeds by splitting during k-means
    backend: str  # e.g. "faiss-cpu", "faiss-gpu x4 (replicated)", "pic-cpu"


def cluster_reduced(x: np.ndarray, cfg: ClusteringConfig, seed: int) -> ClusteringResult:
    """Pseudo-labels of the rows of ``x``, vectors already reduced (PCA, whitening, L2) by
    the stage; ``seed`` seeds k-means (the stage passes a different one each epoch)."""
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
    log.debug("clustered %d points into %d clusters on %s (%d empty, %d re-seeded)",
              x.shape[0], n_clusters, backend, n_empty, n_reseeded)
    return ClusteringResult(labels=labels, n_clusters=n_clusters, objective=objective,
                            sizes=sizes, n_empty=n_empty, n_reseeded=n_reseeded, backend=backend)


def kmeans_labels(x: np.ndarray, k: int, seed: int, niter: int = 20,
                  device: str = "auto", plus_plus: bool = False) -> np.ndarray:
    """k-means labels of already prepared vectors (e.g. L2-normalised features with k = the
    number of true classes, for evaluation); trains on every point. ``plus_plus`` seeds
    with k-means++ instead of random points (for few, tight clusters: see kmeanspp.py)."""
    init = kmeanspp_centroids(x, k, np.random.default_rng(seed)) if plus_plus else None
    return run_kmeans(x, k, seed=seed, niter=niter, device=device, init=init).labels
