"""The clustering stage of an epoch across ranks, each holding the features of its own shard.

Raw features never move: a 4096-d row is 16 times a 256-d one. Instead:

1. PCA statistics (count, sum, sum of outer products about the global mean) are computed
   on every rank, on the device that holds its features, and all-reduced: d x d numbers,
   whatever N is. With ``clustering.pca_sample`` they cover a random subset of the rows,
   drawn over the global row order, so the subset does not depend on the number of ranks.
2. Rank 0 fits the whitening and broadcasts mean and projection, so that every rank applies
   bit-for-bit the same transform (an eigensolver run on every rank might not agree).
3. Every rank projects, whitens and L2-normalises its own rows.
4. gather mode: only these 256-d rows go to rank 0, stacked in rank order, which with
   contiguous shards is global index order; rank 0 clusters them with FAISS (its node's GPUs)
   or PIC and broadcasts the N labels. sharded mode: Lloyd iterations across the ranks
   (the same engine, engine.py), and the ranks exchange their labels.

Steps 1-3 (and the gather of step 4) are :func:`pca_whiten_l2`, the clustering of step 4 is
:func:`kmeans`: the paper's section 3.4 as two calls, with :class:`ReducedRows`, the reduced
rows where the mode leaves them, between them. :func:`cluster_shards` is the two in one.

Features may be numpy arrays or torch tensors on any device (the feature pass leaves them
on the GPU that computed them); the PCA runs where they are, and only the reduced 256-d rows
reach host memory, where the assignment backends and the collectives take them. While rank 0
clusters in gather mode, the other ranks wait on the host (:meth:`Comm.on_host`), leaving
their GPUs to its k-means.

Unreadable images have no row anywhere, so they come out with label -1.
With one process every collective is the identity and this is the single-machine stage.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Optional

import numpy as np
import torch

from dcluster.clustering import cluster_reduced
from dcluster.clustering.assign import release_torch_gpu_cache
from dcluster.clustering.backend import Backend
from dcluster.clustering.engine import Clustering
from dcluster.clustering.kmeans import run_kmeans
from dcluster.clustering.pca import (Features, PCAStats, PCATransform, as_rows, column_sums,
                                     fit_whitening)
from dcluster.parallel.collectives import Comm
from dcluster.core.config import ClusteringConfig
from dcluster.parallel.distributed import shard_bounds
from dcluster.parallel.precision import full_float32

log = logging.getLogger(__name__)

CHUNK_ROWS = 2048
"""Rows per GEMM of the PCA passes: 32 MB of 4096-d floats, still at full BLAS speed, where
the single-process default (8192) would hold 128 MB next to rank 0's gathered matrix."""

STATS_ROWS = 2048
"""Rows per block of the covariance pass: its products are GEMMs of 2048 x 512 x D, at the
BLAS rate. Two blocks (the one being summed and the next one drawn) and PCAStats' centred
copy are alive at once next to the D x D statistics: 3 x 32 MB at D = 4096, where 4096-row
blocks made this pass rank 0's memory peak."""

PCA_SAMPLE_STREAM = 1
"""Mixed into the stage's seed for the PCA sample, so that it is not k-means' own stream."""


@dataclass
class RowLayout:
    """How many feature rows each rank holds (unreadable images have none) and their width."""
    counts: list[int]
    dim: int

    @property
    def total(self) -> int:
        return sum(self.counts)


def row_layout(features: Features, comm: Comm) -> RowLayout:
    """Agreed by all ranks; a rank with no rows has no width, so the widest one is taken."""
    shapes = comm.all_gather_object(tuple(features.shape))
    layout = RowLayout(counts=[n for n, _ in shapes], dim=max(d for _, d in shapes))
    if layout.total == 0:
        raise ValueError("no rank has any feature to cluster (every image unreadable?)")
    return layout


def rows_of(features: Features, layout: RowLayout) -> Features:
    """``features`` as (n, dim): an empty shard's features come without a width."""
    return features if features.shape[0] else np.empty((0, layout.dim), dtype=np.float32)


def pca_sample_rows(layout: RowLayout, rank: int, sample: int, seed: int) -> Optional[np.ndarray]:
    """The positions (ascending, within this rank's rows) of the rows the PCA statistics use,
    or None for all of them (``sample`` 0 or at least the total). The draw is over the global
    row order, so it is the same subset whatever the number of ranks, and a function of
    ``seed`` (the stage's per-epoch seed) alone."""
    if sample == 0 or sample >= layout.total:
        return None
    chosen = np.random.default_rng((seed, PCA_SAMPLE_STREAM)).choice(
        layout.total, size=sample, replace=False)
    lo = sum(layout.counts[:rank])
    mine = chosen[(chosen >= lo) & (chosen < lo + layout.counts[rank])] - lo
    return np.sort(mine)


def row_blocks(x: torch.Tensor, positions: Optional[np.ndarray],
               rows: int = CHUNK_ROWS) -> Iterator[torch.Tensor]:
    """The rows of ``x`` at ``positions`` (all rows if None), ``rows`` at a time."""
    if positions is None:
        for lo in range(0, x.shape[0], rows):
            yield x[lo:lo + rows]
        return
    index = torch.from_numpy(positions).to(x.device)
    for lo in range(0, index.numel(), rows):
        yield x.index_select(0, index[lo:lo + rows])


def fit_shared_transform(x: Features, layout: RowLayout, cfg: ClusteringConfig, comm: Comm,
                         seed: int = 0, device: Optional[torch.device] = None) -> PCATransform:
    """The PCA (and whitening) of all ranks' rows (or of ``cfg.pca_sample`` of them, drawn
    from ``seed``), fitted on rank 0 and the same on every rank, on ``device`` (default: that
    of ``x``, this rank's rows; rows in host memory are streamed to it a block at a time)."""
    rows = as_rows(x)
    device = device or rows.device
    positions = pca_sample_rows(layout, comm.rank, cfg.pca_sample, seed)
    stats = local_stats(rows, positions, layout.dim, comm, device)
    stats.sum, stats.outer = all_reduce_tensor(stats.sum, comm), all_reduce_tensor(stats.outer, comm)
    stats.count = layout.total if positions is None else cfg.pca_sample  # the same everywhere
    out_dim = cfg.pca_dim or layout.dim
    fitted = fit_whitening(stats, out_dim, whiten=cfg.whiten) if comm.is_main else None
    return broadcast_transform(fitted, layout.dim, out_dim, cfg.whiten, comm).to(device)


def local_stats(rows: torch.Tensor, positions: Optional[np.ndarray], dim: int, comm: Comm,
                device: torch.device) -> PCAStats:
    """This rank's PCA statistics of its ``rows`` at ``positions`` (all if None), on
    ``device``, about the shift every rank shares.

    Products about a shift near the mean avoid cancellation (see PCAStats), and the sums of
    all ranks only add up about one common shift: the mean of every rank's first block is
    both, for an all-reduce of d numbers and no pass over the rows of its own. Rows in host
    memory are moved to ``device`` a chunk at a time (PCAStats.update). A function of its own
    so that no block of rows (32 MB at D = 4096) outlives it into the fit."""
    blocks = row_blocks(rows, positions, STATS_ROWS)
    first = next(blocks, None)
    stats = PCAStats(dim, device=device,
                     shift=mean_of_blocks([] if first is None else [first], dim, comm))
    if first is not None:
        stats.update(first, chunk_rows=STATS_ROWS)
    del first
    for block in blocks:
        stats.update(block, chunk_rows=STATS_ROWS)
    return stats


def all_reduce_tensor(t: torch.Tensor, comm: Comm) -> torch.Tensor:
    """``t`` summed over all ranks, through host memory (no copy for CPU tensors)."""
    host = t.cpu()
    comm.all_reduce_sum(host.numpy())
    return host.to(t.device)


def reduce_rows(x: Features, transform: PCATransform, cfg: ClusteringConfig,
                out: Optional[np.ndarray] = None) -> np.ndarray:
    """``x`` projected by ``transform`` (and whitened, if it whitens), then L2-normalised if
    ``cfg.l2_normalize``, on the transform's device; into the host array ``out`` if given."""
    return transform.apply(x, chunk_rows=CHUNK_ROWS, out=out, normalize=cfg.l2_normalize)


def broadcast_transform(fitted: Optional[PCATransform], dim: int, out_dim: int, whiten: bool,
                        comm: Comm) -> PCATransform:
    """Rank 0's fitted transform on every rank, in host memory (``fitted`` is None
    elsewhere)."""
    if fitted is None:
        fitted = PCATransform(mean=torch.zeros(dim), projection=torch.zeros(dim, out_dim),
                              eigenvalues=torch.zeros(out_dim, dtype=torch.float64),
                              whitened=whiten)
    fitted = fitted.to("cpu")
    for tensor in (fitted.mean, fitted.projection, fitted.eigenvalues):
        comm.broadcast(tensor.numpy())
    fitted.solver = comm.broadcast_object(fitted.solver)
    return fitted


@dataclass
class ReducedRows:
    """The stage's vectors between its two steps (PCA, whitening, L2 done; not yet
    clustered), where the mode leaves them, with what :func:`kmeans` needs to give every rank
    the N labels. No raw feature row is in it.

    gather mode: ``rows`` is rank 0's stacked matrix of every rank's rows in global index
    order and ``present`` the images they belong to (bool (N,)); both None on the other
    ranks, which only wait for the labels. sharded mode: ``rows`` are this rank's own rows
    and ``indices`` their global indices (its labels go back to those images)."""
    mode: Literal["gather", "sharded"]
    rows: Optional[np.ndarray]
    n_images: int
    present: Optional[np.ndarray] = None  # gather mode, rank 0
    indices: Optional[np.ndarray] = None  # sharded mode


@contextmanager
def stage_step() -> Iterator[None]:
    """The numerics and memory of each step of the stage: full float32
    (:func:`full_float32`) inside, and the cached GPU memory given back after it, also on an
    exception: the step's blocks and resident rows are garbage then, and the memory goes back
    to the GPU before FAISS, training or the monitor's search allocates. After
    :func:`pca_whiten_l2` in gather mode this is what leaves the waiting ranks' GPUs to rank
    0's k-means (``clustering.gpus=node``)."""
    try:
        with full_float32():
            yield
    finally:
        release_torch_gpu_cache()


def pca_whiten_l2(features: Features, indices: np.ndarray, n_images: int,
                  cfg: ClusteringConfig, comm: Comm, seed: int = 0,
                  device: Optional[torch.device] = None) -> ReducedRows:
    """The paper's preprocessing of every rank's features of its shard (rows of
    ``features``, an array or a tensor on any device, belong to the global ``indices``):
    PCA to ``cfg.pca_dim`` fitted on all ranks' rows, whitening and L2 normalisation (each
    as ``cfg`` asks: ``whiten``, ``l2_normalize``); call on every rank. ``device`` is this rank's device: the PCA runs there, on rows streamed from
    host memory if the memory plan put them there (default: where the rows are). gather mode
    stacks the reduced rows on rank 0 (:func:`gather_reduced`), sharded mode leaves each
    rank its own."""
    with stage_step():
        if cfg.mode == "sharded":
            _, x, transform = shared_transform(features, cfg, comm, seed, device)
            return ReducedRows("sharded", reduce_rows(x, transform, cfg), n_images,
                               indices=indices)
        return gather_reduced(features, indices, n_images, cfg, comm, seed, device)


def shared_transform(features: Features, cfg: ClusteringConfig, comm: Comm, seed: int,
                     device: Optional[torch.device]
                     ) -> tuple[RowLayout, Features, PCATransform]:
    """The ranks' row layout, this rank's rows as (n, dim) and the transform every rank
    applies (:func:`fit_shared_transform`): what both modes start from."""
    layout = row_layout(features, comm)
    x = rows_of(features, layout)
    return layout, x, fit_shared_transform(x, layout, cfg, comm, seed, device)


def gather_reduced(features: Features, indices: np.ndarray, n_images: int,
                   cfg: ClusteringConfig, comm: Comm, seed: int = 0,
                   device: Optional[torch.device] = None) -> ReducedRows:
    """Reduce every rank's rows and stack them on rank 0 in global index order, with the mask
    of the images they belong to (bool (N,)); both None on the other ranks. Rank 0 writes its
    own rows straight into the stacked matrix, so its peak is that matrix (N x 256 float32) or
    the d x d statistics before it, never both. Only the vectors travel, not their indices:
    each rank owns a known contiguous shard, so naming the few images it has no row for
    suffices."""
    present = present_mask(indices, n_images, comm)
    layout, x, transform = shared_transform(features, cfg, comm, seed, device)  # d x d freed
    stacked = own = None
    if comm.is_main:
        release_freed_host_memory()
        stacked = np.empty((layout.total, transform.dim), dtype=np.float32)
        own = stacked[: layout.counts[0]]
    reduced = reduce_rows(x, transform, cfg, out=own)
    stacked = comm.gather_rows(reduced, layout.counts, stacked)
    if stacked is not None:
        release_freed_host_memory()  # the gather rounds' buffers
        log.debug("gathered %d x %d vectors on rank 0 (%.1f MB, %.1f MB of them from other "
                  "ranks)", *stacked.shape, stacked.nbytes / 1e6,
                  (layout.total - layout.counts[0]) * stacked.shape[1] * 4 / 1e6)
    return ReducedRows("gather", stacked, n_images, present=present)


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


def global_mean(x: Features, comm: Comm) -> np.ndarray:
    """The float32 mean of every rank's (n, d) rows ``x``."""
    return mean_of_blocks([x], x.shape[1], comm)


def mean_of_blocks(blocks: Iterable[Features], dim: int, comm: Comm) -> np.ndarray:
    """The float32 mean of every rank's rows, given in blocks: summed in float64 on their
    device, then the sums and the count all-reduced."""
    totals = np.zeros(dim + 1)
    for block in blocks:
        rows = as_rows(block)
        totals[:-1] += column_sums(rows).cpu().numpy()
        totals[-1] += rows.shape[0]
    totals = comm.all_reduce_sum(totals)
    return (totals[:-1] / totals[-1]).astype(np.float32)


def release_freed_host_memory() -> None:
    """Give the host memory the PCA's freed blocks leave in glibc's heaps back to the system
    (``malloc_trim(0)``, glibc's malloc_trim(3)), before rank 0 allocates the gathered matrix:
    blocks under glibc's mmap threshold (up to 32 MB) stay in the heap when freed, and would
    otherwise sit under the matrix in rank 0's peak. A no-op where the C library has none."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _libc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def sharded_kmeans(x: np.ndarray, k: int, seed: int, cfg: ClusteringConfig, comm: Comm,
                   device: torch.device, backend: Optional[Backend] = None) -> Clustering:
    """k-means of every rank's rows ``x`` (float32, host memory), each rank assigning its own
    on its ``device`` with ``backend`` (the run's, resolved once; default: chosen from
    ``cfg`` for this call), never on its peers' GPUs, whatever ``clustering.gpus``; the labels
    are this rank's rows'."""
    return run_kmeans(x, k, seed=seed, niter=cfg.niter, device=cfg.device,
                      backend=cfg.backend if backend is None else backend, comm=comm,
                      own_device=device)


def kmeans(x: ReducedRows, cfg: ClusteringConfig, comm: Comm, seed: int,
           device: Optional[torch.device] = None,
           backend: Optional[Backend] = None) -> Clustering:
    """The pseudo-labels of all N images from the reduced rows of :func:`pca_whiten_l2`:
    ``cfg.k``-means (or PIC, ``clustering.method=pic``, in gather mode) seeded by ``seed``;
    call on every rank. gather mode: rank 0 clusters the stacked rows while the other ranks
    wait on the host, then broadcasts; sharded mode: Lloyd iterations across the ranks, each
    assigning its own rows on its ``device``. ``backend`` is the run's k-means backend,
    resolved once (default: chosen from ``cfg`` for this call). The result is the same on
    every rank; its labels are the N images', -1 for those without a row."""
    with stage_step():
        if x.mode == "sharded":
            result = sharded_kmeans(x.rows, cfg.k, seed, cfg, comm, device, backend)
            result.labels = spread_labels(result.labels, x.indices, x.n_images, comm)
            return result
        return clustered_on_rank0(x, cfg, comm, seed, device, backend)


def clustered_on_rank0(x: ReducedRows, cfg: ClusteringConfig, comm: Comm, seed: int,
                       device: Optional[torch.device], backend: Optional[Backend]) -> Clustering:
    """gather mode's clustering: rank 0 clusters its stacked rows, every rank receives the N
    labels and the result's statistics."""
    labels = np.empty(x.n_images, dtype=np.int64)
    result = None
    if x.rows is not None:
        result = cluster_reduced(x.rows, cfg, seed, device, backend)
        labels.fill(-1)
        labels[x.present] = result.labels
        result.labels = None  # the N labels travel apart, as an array
    # on the host: an NCCL broadcast would occupy the waiting ranks' GPUs for the
    # minutes rank 0's k-means works on them
    host = comm.on_host()
    host.broadcast(labels)
    result = host.broadcast_object(result)
    result.labels = labels
    return result


def cluster_shards(features: Features, indices: np.ndarray, n_images: int,
                   cfg: ClusteringConfig, comm: Comm, seed: int,
                   device: torch.device, backend: Optional[Backend] = None) -> Clustering:
    """The whole stage in one call, :func:`pca_whiten_l2` then :func:`kmeans` (both seeded
    by ``seed``), for callers that do not need the reduced rows in between (the benchmarks,
    the tests). The reduced rows are freed when it returns."""
    return kmeans(pca_whiten_l2(features, indices, n_images, cfg, comm, seed, device), cfg,
                  comm, seed, device, backend)
