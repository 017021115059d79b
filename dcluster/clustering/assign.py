"""Assignment backends of the k-means engine: which centroid is nearest each row, and the
per-cluster sums of the rows, wherever the rows live and whatever computes the distances.

The interface follows FAISS's ``contrib/clustering.py`` ``DatasetAssign`` (count, dim,
get_subset, assign_to returning the assignment, distances and per-centroid sums), written
for this project: the rows stay inside the backend, and the sums come back in float64 so
that they add up exactly enough across chunks, GPUs and ranks.

* :class:`FaissAssign`: an exact flat L2 index, on the CPU (``IndexFlatL2``), on one GPU, or
  replicated on the node's GPUs (``index_cpu_to_all_gpus`` with ``shard=False`` builds an
  ``IndexReplicas``, whose search splits the queries into one contiguous part per GPU:
  faiss/IndexReplicas.cpp ``IndexReplicasTemplate::search``). float16 is off so that the GPU
  and CPU assign alike.
* :class:`TorchAssign`: ``||c||^2 - 2 x c^T`` as one float32 GEMM per chunk of rows
  (``torch.addmm``), its argmin, and ``||x||^2`` added back for the distance: the same work a
  flat index does, on any device torch runs on (a P100 included, for which no FAISS wheel
  has code), with the rows split over several devices for a node's GPUs; rows stay on the
  device when they fit, else stream from host memory a chunk at a time; the sums are exact
  integers (:class:`ExactSums`), so a GPU run is bit-reproducible.

FAISS's GPU resources allocate outside torch's caching allocator (``StandardGpuResources``
reserves up to 1.5 GiB of temporary memory), so torch's cache is emptied before any FAISS GPU
index is built (:func:`release_torch_gpu_cache`).
"""
from __future__ import annotations

import abc
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import scipy.sparse
import torch

from dcluster.core.faiss_after_torch import faiss

log = logging.getLogger(__name__)

CPU_SCRATCH_BYTES = 256 << 20
"""Room for one chunk's rows x centroids distances on the CPU."""

GPU_SCRATCH_SHARE = 0.25
"""Share of a GPU's free memory one chunk's distances may take."""

RESIDENT_SHARE = 0.5
"""Share of a GPU's free memory a rank's rows may take to stay there between iterations;
larger, they stay in host memory and go to the GPU a chunk at a time every iteration."""


@dataclass
class Assignment:
    """One pass over a rank's rows."""
    labels: np.ndarray  # int64 (n,): nearest centroid of each row
    objective: float  # sum of the squared distances to it
    counts: np.ndarray  # int64 (k,)
    sums: Optional[np.ndarray] = None  # float64 (k, d): sum of each cluster's rows, if asked


CHECK_ROWS = 16384
"""Rows checked for finiteness at a time: a whole-matrix check would hold an N x d boolean
array, a quarter of the gathered matrix, at rank 0's peak."""


def as_points(x: np.ndarray) -> np.ndarray:
    """``x`` as the C-contiguous float32 (N, d) array FAISS needs, checked to be finite."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"points must be an (N, d) array, got shape {x.shape}")
    if not all(np.isfinite(x[lo:lo + CHECK_ROWS]).all() for lo in range(0, len(x), CHECK_ROWS)):
        finite = np.isfinite(x)
        raise ValueError(f"points contain {x.size - int(finite.sum())} non-finite values "
                         f"(NaN or inf) in {int((~finite.all(axis=1)).sum())} rows")
    return x


class Assigner(abc.ABC):
    """A rank's rows (float32, host memory; a backend may keep copies on its devices) and a
    way to assign them to centroids."""

    name: str  # the backend, as logs and results report it

    def __init__(self, x: np.ndarray) -> None:
        self.x = as_points(x)

    def count(self) -> int:
        return self.x.shape[0]

    def dim(self) -> int:
        return self.x.shape[1]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The rows at ``positions``."""
        return self.x[positions]

    @abc.abstractmethod
    def subset(self, positions: np.ndarray) -> "Assigner":
        """The same backend over the rows at ``positions`` only."""

    @abc.abstractmethod
    def assign_to(self, centroids: np.ndarray, with_sums: bool) -> Assignment:
        """Every row's nearest centroid (float32 (k, d) ``centroids``), the objective and
        counts, and with ``with_sums`` the per-cluster sums of the rows."""


class FaissAssign(Assigner):
    """Rows in host memory, assigned by a FAISS flat L2 index (CPU, one GPU or replicas)."""

    def __init__(self, x: np.ndarray, index: faiss.Index, name: str) -> None:
        super().__init__(x)
        self.index, self.name = index, name

    def subset(self, positions: np.ndarray) -> "FaissAssign":
        return FaissAssign(self.x[positions], self.index, self.name)

    def assign_to(self, centroids: np.ndarray, with_sums: bool) -> Assignment:
        k, d = centroids.shape
        self.index.reset()
        self.index.add(centroids)
        # one search over all rows, as faiss.Clustering does: FAISS picks its BLAS or its
        # SIMD kernel by the number of queries (faiss.cvar.distance_compute_blas_threshold),
        # and chunks of 8192 rows were 25% slower than one call
        distances, assigned = self.index.search(self.x, 1)
        labels = assigned.ravel()
        objective = float(distances.sum(dtype=np.float64))
        sums = summed_by_label(torch.from_numpy(self.x), torch.from_numpy(labels), k) \
            if with_sums else None
        return Assignment(labels, objective, np.bincount(labels, minlength=k),
                          None if sums is None else sums.numpy())


def summed_by_label(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """float64 (k, d) sums of the host rows ``x`` per label, accumulated in float32 as FAISS's
    own centroid update does (faiss/Clustering.cpp ``compute_centroids``): the product of a
    sparse k x n indicator matrix with the rows (scipy, one thread), where torch's
    multi-threaded CPU ``index_add_`` took 50 times as long on the shared 2-core machines
    (121 ms against 2.4 ms for 20k x 256 rows)."""
    n = x.shape[0]
    indicator = scipy.sparse.csr_matrix(
        (np.ones(n, dtype=np.float32), (labels.numpy(), np.arange(n))), shape=(k, n))
    return torch.from_numpy(np.asarray(indicator @ x.numpy(), dtype=np.float64))


def fixed_point_scale(bound: float, rows: int) -> float:
    """The power of two that turns values of magnitude at most ``bound`` into integers whose
    sum over ``rows`` rows stays below 2**62: the resolution is then about
    ``bound * rows * 2**-62`` (2**-42 for a million unit rows), far finer than float32's."""
    if bound <= 0 or rows <= 0:
        return 1.0
    return 2.0 ** (62 - math.ceil(math.log2(bound * rows)))


class ExactSums:
    """Per-cluster sums of rows, bit-for-bit the same whatever the order of the rows, the
    chunking and the device: each value becomes an int64 fixed-point number
    (:func:`fixed_point_scale`) and integer additions are exact, so the order in which
    ``index_add_``'s atomics land (on a GPU, aten/src/ATen/native/cuda/Indexing.cu
    ``index_add_cuda_impl``: atomic adds, which in float32 make GPU runs irreproducible)
    cannot change the total. ``bound`` and ``rows`` bound every value and the number of rows
    summed, for all chunks together."""

    def __init__(self, k: int, d: int, bound: float, rows: int, device: torch.device) -> None:
        self.scale = fixed_point_scale(bound, rows)
        self.total = torch.zeros(k, d, dtype=torch.int64, device=device)

    def add(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the rows ``x`` (on the sums' device) to the clusters ``labels``."""
        # in place: one float64 and one int64 copy of the chunk, not four temporaries
        fixed = x.to(torch.float64, copy=True).mul_(self.scale).round_().long()
        self.total.index_add_(0, labels, fixed)

    @staticmethod
    def combined(parts: Sequence["ExactSums"]) -> np.ndarray:
        """The float64 (k, d) sums of several parts made with one scale (one per device),
        added as integers, so exactly."""
        total = sum(part.total.cpu() for part in parts[1:]) + parts[0].total.cpu()
        return total.double().numpy() / parts[0].scale


def faiss_cpu(x: np.ndarray) -> FaissAssign:
    return FaissAssign(x, faiss.IndexFlatL2(x.shape[1]), "faiss-cpu")


def release_torch_gpu_cache() -> None:
    """Give the memory torch's caching allocator holds but does not use back to the GPUs
    (``torch.cuda.empty_cache`` frees every device's cache), so that FAISS, which allocates
    with cudaMalloc beside it, finds it free: on a 16 GB card the training's cache alone can
    leave FAISS's temporary memory no room. Nothing to do before CUDA is initialised."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def replicated_flat_index(d: int, ngpu: int) -> faiss.Index:
    """An exact L2 index replicated on ``ngpu`` GPUs, float16 off; API as in
    faiss/python/gpu_wrappers.py ``index_cpu_to_all_gpus(index, co, ngpu)`` and
    ``GpuMultipleClonerOptions`` (faiss/gpu/GpuClonerOptions.h: ``shard``, ``useFloat16``)."""
    release_torch_gpu_cache()
    options = faiss.GpuMultipleClonerOptions()
    options.shard = False
    options.useFloat16 = False
    return faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(d), co=options, ngpu=ngpu)


def faiss_gpus(x: np.ndarray, ngpu: int) -> FaissAssign:
    """Centroids replicated on ``ngpu`` GPUs, each assigning its share of the rows."""
    return FaissAssign(x, replicated_flat_index(x.shape[1], ngpu),
                       f"faiss-gpu x{ngpu} (replicated)")


def faiss_gpu(x: np.ndarray, gpu: int) -> FaissAssign:
    """On this rank's own GPU ``gpu`` (sharded mode: each rank assigns only its rows).
    faiss/python/gpu_wrappers.py and faiss/gpu/GpuCloner.h: ``index_cpu_to_gpu(resources,
    device, index, options)``; the resources must outlive the index."""
    release_torch_gpu_cache()
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = False
    index = faiss.index_cpu_to_gpu(resources, gpu, faiss.IndexFlatL2(x.shape[1]), options)
    index.referenced_objects = [resources]
    return FaissAssign(x, index, f"faiss-gpu {gpu}")


def scratch_rows(device: torch.device, k: int, d: int) -> int:
    """Rows per chunk of :class:`TorchAssign`: the chunk's float32 distances to ``k``
    centroids, its ``d``-wide rows (streamed from host memory) and their fixed-point copy for
    the sums (:class:`ExactSums`) fit a share of the device's free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_SCRATCH_SHARE)
    else:
        budget = CPU_SCRATCH_BYTES
    return max(1, budget // (4 * (k + 2) + 20 * d))


def fits_on_device(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` of rows may stay on ``device`` between iterations: a share of a
    GPU's free memory (the rest for the chunks' distances, FAISS or the next stage); the CPU
    holds them anyway."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free * RESIDENT_SHARE


@contextlib.contextmanager
def exact_float32_matmul() -> Iterator[None]:
    """float32 GEMMs without TF32 inside, whatever the training set
    (dcluster/parallel/execution.py turns TF32 on for Ampere and later): TF32's 10-bit mantissa would
    move distances by ~1e-3 and assign rows unlike FAISS's float32 flat index. The flag is
    read when a product is launched, so it can be restored before the GPU has run it."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass
class DeviceRows:
    """One device's contiguous part of the rows: in host memory, and on the device too when
    they fit there (``resident``), else copied to it a chunk at a time."""
    device: torch.device
    host: np.ndarray
    resident: Optional[torch.Tensor]

    def chunks(self, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows on the device) ``step`` rows at a time."""
        for lo in range(0, self.host.shape[0], step):
            yield lo, (self.resident[lo:lo + step] if self.resident is not None
                       else torch.from_numpy(self.host[lo:lo + step]).to(self.device))


class TorchAssign(Assigner):
    """Rows split into one contiguous part per device in ``devices`` (a rank's own device,
    or with ``clustering.gpus=node`` its node's GPUs), assigned by chunked float32 GEMMs. A
    part stays on its device when it fits (:func:`fits_on_device`), otherwise it streams from
    host memory a chunk at a time: one code path, the chunk's source the only difference,
    so both give the same labels. ``resident`` forces the choice and ``chunk_rows`` the chunk
    size (tests, benchmarks); the sums are exact (:class:`ExactSums`), so neither the split
    nor the chunking nor a GPU's atomics change them."""

    def __init__(self, x: np.ndarray, devices: Sequence[torch.device],
                 resident: Optional[bool] = None, chunk_rows: int = 0) -> None:
        super().__init__(x)
        self.devices = [torch.device(d) for d in devices]
        self.chunk_rows = chunk_rows
        self.bound = float(np.abs(self.x).max()) if self.x.size else 0.0
        bounds = np.linspace(0, self.x.shape[0], len(self.devices) + 1).astype(np.int64)
        self.parts = []
        for dev, lo, hi in zip(self.devices, bounds[:-1], bounds[1:]):
            host = self.x[lo:hi]
            keep = fits_on_device(dev, host.nbytes) if resident is None else resident
            on_device = torch.from_numpy(host).to(dev) if keep else None
            self.parts.append(DeviceRows(dev, host, on_device))
            log.log(logging.INFO if dev.type == "cuda" else logging.DEBUG,
                    "k-means rows %d x %d on %s: %s", host.shape[0], host.shape[1], dev,
                    "resident" if keep else "streamed from host memory each iteration")
        kinds = sorted({d.type for d in self.devices})
        self.name = f"torch {'/'.join(kinds)}" + (f" x{len(self.devices)}"
                                                 if len(self.devices) > 1 else "")
        self._resident = resident

    def subset(self, positions: np.ndarray) -> "TorchAssign":
        return TorchAssign(self.x[positions], self.devices, self._resident, self.chunk_rows)

    def assign_to(self, centroids: np.ndarray, with_sums: bool) -> Assignment:
        k, d = centroids.shape
        with exact_float32_matmul():
            done = [self._assign_part(part, torch.from_numpy(centroids), with_sums)
                    for part in self.parts]
        labels = np.concatenate([lab.cpu().numpy() for lab, _, _ in done]
                                or [np.empty(0, dtype=np.int64)])
        objective = float(sum(float(obj) for _, obj, _ in done))
        sums = ExactSums.combined([s for _, _, s in done]) if with_sums else None
        return Assignment(labels, objective, np.bincount(labels, minlength=k), sums)

    def _assign_part(self, part: DeviceRows, centroids: torch.Tensor, with_sums: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, Optional[ExactSums]]:
        """(labels, objective, sums) of one device's rows, left on that device."""
        c = centroids.to(part.device)
        k, d = c.shape
        c_norms = (c * c).sum(dim=1)
        labels = torch.empty(part.host.shape[0], dtype=torch.int64, device=part.device)
        objective = torch.zeros((), dtype=torch.float64, device=part.device)
        sums = ExactSums(k, d, self.bound, self.count(), part.device) if with_sums else None
        for lo, chunk in part.chunks(self.chunk_rows or scratch_rows(part.device, k, d)):
            # ||x - c||^2 = ||x||^2 + ||c||^2 - 2 x.c; the row's own norm does not change
            # which centroid is nearest, so it is added after the argmin
            partial = torch.addmm(c_norms, chunk, c.T, beta=1.0, alpha=-2.0)
            nearest, assigned = partial.min(dim=1)
            del partial
            labels[lo:lo + chunk.shape[0]] = assigned
            objective += (nearest + (chunk * chunk).sum(dim=1)).clamp_min_(0).sum(
                dtype=torch.float64)
            if sums is not None:
                sums.add(chunk, assigned)
        return labels, objective, sums
