"""Clustering of prepared vectors: k-means or PIC -> pseudo-labels.

Preprocessing follows the paper's section 3.4: PCA to 256 dimensions, whitening, L2
normalisation, then k-means on every point (the engine: engine.py). The epoch's stage, with
that preprocessing across ranks, is :func:`dcluster.clustering.distributed_stage.pca_whiten_l2`
then :func:`dcluster.clustering.distributed_stage.kmeans`, which in gather mode hands rank 0's
reduced vectors to :func:`cluster_reduced` here.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from dcluster.clustering.backend import Backend
from dcluster.clustering.engine import Clustering
from dcluster.clustering.kmeans import run_kmeans
from dcluster.clustering.kmeanspp import kmeanspp_centroids
from dcluster.clustering.pic import run_pic
from dcluster.core.config import ClusteringConfig
from dcluster.parallel.collectives import Comm

log = logging.getLogger(__name__)

__all__ = ["Clustering", "cluster_reduced", "kmeans_labels"]


def cluster_reduced(x: np.ndarray, cfg: ClusteringConfig, seed: int,
                    own_device: Optional[torch.device] = None,
                    backend: Optional[Backend] = None) -> Clustering:
    """Pseudo-labels of the rows of ``x``, vectors already reduced (PCA, whitening, L2) by
    the stage; ``seed`` seeds k-means (the stage passes a different one each epoch). k-means
    assigns with ``backend`` (the run's, resolved once; default: chosen from ``cfg`` for this
    call) on ``own_device`` (this process's device), or on the node's GPUs with
    ``clustering.gpus=node``."""
    if cfg.method == "kmeans":
        result = run_kmeans(x, cfg.k, seed=seed, niter=cfg.niter,
                            max_points_per_centroid=cfg.max_points_per_centroid,
                            device=cfg.device, backend=cfg.backend if backend is None else backend,
                            own_device=own_device,
                            node_gpus=cfg.gpus == "node")
    elif cfg.method == "pic":
        pic = run_pic(x, sigma=cfg.pic.sigma, alpha=cfg.pic.alpha, knn=cfg.pic.knn,
                      iterations=cfg.pic.iterations, device=cfg.device)
        result = Clustering(labels=pic.labels, n_clusters=pic.n_clusters, objective=float("nan"),
                            sizes=pic.sizes, n_empty=0, n_reseeded=0, backend=pic.backend)
    else:
        raise ValueError(f"unknown clustering method {cfg.method!r} (expected kmeans or pic)")
    log.debug("clustered %d points into %d clusters on %s (%d empty, %d re-seeded)",
              x.shape[0], result.n_clusters, result.backend, result.n_empty, result.n_reseeded)
    return result


def kmeans_labels(x: np.ndarray, k: int, seed: int, niter: int = 20, device: str = "auto",
                  plus_plus: bool = False, backend: str = "auto", comm: Optional[Comm] = None,
                  own_device: Optional[torch.device] = None) -> np.ndarray:
    """k-means labels of already prepared vectors (e.g. L2-normalised features with k = the
    number of true classes, for evaluation); trains on every point. ``plus_plus`` seeds
    with k-means++ instead of random points (for few, tight clusters: see kmeanspp.py). With
    ``comm``, the k-means of every rank's rows ``x``, each rank assigning its own on
    ``own_device`` (its labels are its rows'); one process gives the same clustering."""
    init = (kmeanspp_centroids(x, k, np.random.default_rng(seed), comm) if plus_plus
            else None)
    return run_kmeans(x, k, seed=seed, niter=niter, device=device, init=init, backend=backend,
                      comm=comm, own_device=own_device).labels
