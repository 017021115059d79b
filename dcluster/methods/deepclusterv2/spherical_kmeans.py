"""DeepCluster-v2's clustering: spherical k-means of the L2-normalised embeddings of the
memory bank, spread over the ranks (swav's main_deepclusterv2.py ``cluster_memory``): each
row goes to the centroid of largest dot product, each centroid becomes the normalised sum of
its rows, for a fixed number of iterations, then a last assignment.

It runs on the project's one k-means engine (dcluster/clustering/engine.py ``lloyd``): for
unit rows and unit centroids the L2-nearest centroid is the one of largest dot product, so
the engine's assignment backends serve unchanged, and its ``spherical`` option normalises
the centroids after each update. Every rank holds only its own rows (possibly none); one
all-reduce of k x (d + 1) sums and counts per iteration gives all the same centroids.

Where it differs from swav: the initial centroids are drawn from all ranks' rows (the
engine's seeded draw), not from rank 0's alone, and an empty cluster is re-seeded by
splitting a large one (the engine's rule, FAISS's) where swav keeps its old centroid.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from dcluster.clustering.assign import as_points
from dcluster.clustering.backend import Backend
from dcluster.clustering.engine import Clustering, lloyd
from dcluster.clustering.kmeans import assigner_for, resolve_backend
from dcluster.parallel.collectives import Comm

UNIT_TOLERANCE = 1e-3
"""How far from 1 a row's norm may be: rows normalised in float32 (or kept in a half-precision
bank) are within it; an unset bank row (zeros) or unnormalised features are not."""


def spherical_kmeans(x: np.ndarray, k: int, *, iters: int, seed: int,
                     comm: Optional[Comm] = None, init: Optional[np.ndarray] = None,
                     backend: str | Backend = "auto", device: str = "auto",
                     own_device: Optional[torch.device] = None) -> Clustering:
    """Spherical k-means of the union of every rank's unit rows ``x`` ((n_local, d),
    n_local may be 0) into ``k`` clusters; with ``comm`` call it on every rank with the same
    ``k``, ``iters`` and ``seed``.

    Returns the engine's :class:`Clustering`: ``labels`` of this rank's rows, ``centroids``
    (k, d) of unit norm, the same on every rank. ``init`` (k, d, unit rows) replaces the
    seeded draw of initial centroids; ``backend``, ``device`` and ``own_device`` choose where
    the rows are assigned, as for every k-means of the project
    (:func:`dcluster.clustering.kmeans.run_kmeans`)."""
    x = as_points(x)
    norms = np.linalg.norm(x, axis=1)
    if not np.all(np.abs(norms - 1.0) <= UNIT_TOLERANCE):
        worst = float(norms[np.argmax(np.abs(norms - 1.0))])
        raise ValueError(f"spherical k-means needs L2-normalised rows; a row has norm {worst:.6g}")
    data = assigner_for(x, resolve_backend(backend, device), own_device)
    return lloyd(data, k, niter=iters, seed=seed, comm=comm, init=init, spherical=True)
