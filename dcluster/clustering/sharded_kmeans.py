"""k-means over points spread across ranks, none of which holds more than its own shard.

For YFCC100M-scale runs, where the N x 256 float32 vectors (100 GB at N = 100M) fit no single
host: the engine's Lloyd loop (engine.py) on every rank over its own rows, FAISS assigning
them on the rank's own GPU or on the CPU; only k x (d + 1) numbers move per iteration. The
epoch's stage picks the backend from the configuration (distributed_stage.py); this entry
point is FAISS's.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from dcluster.clustering.assign import as_points, faiss_cpu, faiss_gpu
from dcluster.clustering.engine import Clustering, lloyd, split_empty_clusters
from dcluster.parallel.collectives import Comm

__all__ = ["sharded_kmeans", "split_empty_clusters"]


def sharded_kmeans(x: np.ndarray, k: int, *, seed: int, niter: int, comm: Comm,
                   gpu: Optional[int] = None) -> Clustering:
    """Cluster the union of every rank's rows ``x`` (float32 (n_local, d), n_local may be 0)
    into ``k`` groups, FAISS assigning on GPU ``gpu`` or the CPU; call on every rank with the
    same ``k``, ``seed`` and ``niter``."""
    x = as_points(x)
    data = faiss_gpu(x, gpu) if gpu is not None else faiss_cpu(x)
    return lloyd(data, k, niter=niter, seed=seed, comm=comm)
