"""The clustering stage of an epoch across ranks, each holding the features of its own shard.

Raw features never move: a 4096-d row is 16 times a 256-d one. Instead:

1. PCA statistics (count, sum, sum of outer products about the global mean) are computed
   on every rank and all-reduced: d x d numbers, whatever N is.
2. Rank 0 fits the whitening and broadcasts mean and projection, so that every rank applies
   bit-for-bit the same transform (an eigensolver run on every rank might not agree).
3. Every rank projects, whitens and L2-normalises its own rows.
4. gather mode: only these 256-d rows go to rank 0, stacked in rank order, which with
   contiguous shards is global index order; rank 0 clusters them with FAISS (its node's GPUs)
   or PIC and broadcasts the N labels. sharded mode: Lloyd iterations across the ranks
   (sharded_kmeans), and the ranks exchange their labels.

Unreadable images have no row anywhere, so they come out with label -1.
With one process every collective is the identity and this is the single-machine stage.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from dcluster.clustering import cluster_reduced
from dcluster.clustering.kmeans import resolve_gpus
from dcluster.clustering.pca import PCAStats, PCATransform, fit_whitening, l2_normalize
from dcluster.clustering.sharded_kmeans import sharded_kmeans
from dcluster.collectives import Comm
from dcluster.config import ClusteringConfig
from dcluster.distributed import shard_bounds

log = logging.getLogger(__name__)

CHUNK_ROWS = 2048
"""Rows per GEMM of the PCA passes: 32 MB of 4096-d floats, still at full BLAS speed, where
the single-process default (8192) would hold 128 MB next to rank 0's gathered matrix."""


@dataclass
class StageResult:
    """The same on every rank."""
    labels: np.ndarray  # int64 (N,), -1 for images without features (unreadable)
    n_clusters: int
    # k-means, both modes: the sum over all points of the squared distance of the final
    # assignment to the final centroids; nan for PIC
    objective: float
    n_empty: int
    n_reseeded: int
    backend: str


@dataclass
class RowLayout:
    """How many feature rows each rank holds (unreadable images have none) and their width."""
    counts: list[int]
    dim: int

    @property
    def total(self) -> int:
        return sum(self.counts)


def row_layout(features: np.ndarray, comm: Comm) -> RowLayout:
    """Agreed by all ranks; a rank with no rows has no width, so the widest one is taken."""
    shapes = comm.all_gather_object(features.shape)
    layout = RowLayout(counts=[n for n, _ in shapes], dim=max(d for _, d in shapes))
    if layout.total == 0:
        raise ValueError("no rank has any feature to cluster (every image unreadable?)")
    return layout


def rows_of(features: np.ndarray, layout: RowLayout) -> np.ndarray:
    """``features`` as (n, dim): an empty shard's features come without a width."""
    return features if features.shape[0] else np.empty((0, layout.dim), dtype=np.float32)


def fit_shared_transform(x: np.ndarray, layout: RowLayout, cfg: ClusteringConfig,
                         comm: Comm) -> PCATransform:
    """The PCA (and whitening) of all ranks' rows, fitted on rank 0 and the same on every
    rank; ``x`` is this rank's rows."""
    # products about a shift near the mean avoid cancellation (see PCAStats), and the sums of
    # all ranks only add up about one common shift: the global mean is both, for one cheap
    # pass and an all-reduce of d numbers
    stats = PCAStats(layout.dim, shift=global_mean(x, comm)).update(x, chunk_rows=CHUNK_ROWS)
    comm.all_reduce_sum(stats.sum.numpy())
    comm.all_reduce_sum(stats.outer.numpy())
    stats.count = layout.total
    out_dim = cfg.pca_dim or layout.dim
    fitted = fit_whitening(stats, out_dim, whiten=cfg.whiten) if comm.is_main else None
    return broadcast_transform(fitted, layout.dim, out_dim, cfg.whiten, comm)


def reduce_rows(x: np.ndarray, transform: PCATransform, cfg: ClusteringConfig,
                out: Optional[np.ndarray] = None) -> np.ndarray:
    """``x`` projected by ``transform`` (and whitened, if it whitens), then L2-normalised if
    ``cfg.l2_normalize``; into ``out`` if given."""
    reduced = transform.apply(x, chunk_rows=CHUNK_ROWS, out=out)
    return l2_normalize(reduced) if cfg.l2_normalize else reduced


def broadcast_transform(fitted: Optional[PCATransform], dim: int, out_dim: int, whiten: bool,
                        comm: Comm) -> PCATransform:
    """Rank 0's fitted transform on every rank (``fitted`` is None elsewhere)."""
    if fitted is None:
        fitted = PCATransform(mean=torch.zeros(dim), projection=torch.zeros(dim, out_dim),
                              eigenvalues=torch.zeros(out_dim, dtype=torch.float64),
                              whitened=whiten)
    for tensor in (fitted.mean, fitted.projection, fitted.eigenvalues):
        comm.broadcast(tensor.numpy())
    return fitted


def gather_reduced(features: np.ndarray, indices: np.ndarray, n_images: int,
                   cfg: ClusteringConfig, comm: Comm) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Reduce every rank's rows and stack them on rank 0 in global index order, with the mask
    of the images they belong to (bool (N,)); None on the other ranks. Rank 0 writes its own
    rows straight into the stacked matrix, so its peak is that matrix (N x 256 float32) or the
    d x d statistics before it, never both. Only the vectors travel, not their indices: each
    rank owns a known contiguous shard, so naming the few images it has no row for suffices."""
    layout = row_layout(features, comm)
    present = present_mask(indices, n_images, comm)
    x = rows_of(features, layout)
    transform = fit_shared_transform(x, layout, cfg, comm)  # its d x d statistics are freed
    stacked = own = None
    if comm.is_main:
        stacked = np.empty((layout.total, transform.dim), dtype=np.float32)
        own = stacked[: layout.counts[0]]
    reduced = reduce_rows(x, transform, cfg, out=own)
    stacked = comm.gather_rows(reduced, layout.counts, stacked)
    if stacked is None:
        return None
    log.debug("gathered %d x %d vectors on rank 0 (%.1f MB, %.1f MB of them from other ranks)",
              *stacked.shape, stacked.nbytes / 1e6,
              (layout.total - layout.counts[0]) * stacked.shape[1] * 4 / 1e6)
    return stacked, present


def present_mask(indices: np.ndarray, n_images: int, comm: Comm) -> Optional[np.ndarray]:
    """On rank 0, which of the N images have a feature row on some rank (rows stacked in rank
    order are then exactly these, ascending); None elsewhere."""
    lo, hi = own_shard(indices, n_images, comm)
    absent = np.setdiff1d(np.arange(lo, hi), indices, assume_unique=True)
    everyone = comm.all_gather_object(absent)
    if not comm.is_main:
        return None
    present = np.ones(n_images, dtype=bool)
    present[np.concatenate(everyone)] = False
    return present


def own_shard(indices: np.ndarray, n_images: int, comm: Comm) -> tuple[int, int]:
    """This rank's shard [lo, hi) of the global indices, after checking that ``indices`` (its
    feature rows' images) lie in it in ascending order, as the stages rely on."""
    bounds = shard_bounds(n_images, comm.world_size)
    lo, hi = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
    if indices.size and (indices[0] < lo or indices[-1] >= hi or np.any(np.diff(indices) <= 0)):
        raise ValueError(f"rank {comm.rank}: feature rows must belong to its shard [{lo}, {hi}) "
                         "in ascending index order")
    return lo, hi


def spread_labels(local: np.ndarray, indices: np.ndarray, n_images: int, comm: Comm) -> np.ndarray:
    """The N labels on every rank from each rank's labels of its own rows (global
    ``indices``, in its shard); -1 where no rank has a row."""
    own_shard(indices, n_images, comm)
    labels = np.full(n_images, -1, dtype=np.int64)
    labels[indices] = local
    return comm.all_gather_segments(labels, shard_bounds(n_images, comm.world_size))


def global_mean(x: np.ndarray, comm: Comm) -> np.ndarray:
    """The float32 mean of every rank's rows of ``x`` (a float64 sum and a count all-reduced)."""
    totals = comm.all_reduce_sum(np.append(x.sum(axis=0, dtype=np.float64), x.shape[0]))
    return (totals[:-1] / totals[-1]).astype(np.float32)


def own_gpu(device: torch.device, choice: str) -> Optional[int]:
    """The GPU this rank's FAISS assignments run on in sharded mode (its training GPU), or None
    for the CPU; ``choice`` is clustering.device (auto | cpu | gpu)."""
    return device.index if device.type == "cuda" and resolve_gpus(choice) else None


def cluster_shards(features: np.ndarray, indices: np.ndarray, n_images: int,
                   cfg: ClusteringConfig, comm: Comm, seed: int,
                   device: torch.device) -> StageResult:
    """Pseudo-labels of all N images from every rank's features of its shard (rows of
    ``features`` belong to the global ``indices``); call on every rank. ``device`` is this
    rank's device (sharded mode assigns on it)."""
    if cfg.mode == "sharded":
        layout = row_layout(features, comm)
        x = rows_of(features, layout)
        reduced = reduce_rows(x, fit_shared_transform(x, layout, cfg, comm), cfg)
        km = sharded_kmeans(reduced, cfg.k, seed=seed, niter=cfg.niter, comm=comm,
                            gpu=own_gpu(device, cfg.device))
        labels = spread_labels(km.labels, indices, n_images, comm)
        summary = (cfg.k, km.objective, km.n_empty, km.n_reseeded, km.backend)
    else:
        gathered = gather_reduced(features, indices, n_images, cfg, comm)
        labels = np.empty(n_images, dtype=np.int64)
        summary = None
        if gathered is not None:
            stacked, present = gathered
            result = cluster_reduced(stacked, cfg, seed)
            labels.fill(-1)
            labels[present] = result.labels
            summary = (result.n_clusters, result.objective, result.n_empty,
                       result.n_reseeded, result.backend)
        comm.broadcast(labels)
        summary = comm.broadcast_object(summary)
    n_clusters, objective, n_empty, n_reseeded, backend = summary
    return StageResult(labels=labels, n_clusters=n_clusters, objective=objective,
                       n_empty=n_empty, n_reseeded=n_reseeded, backend=backend)
