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
  has code), with the rows split over several devices for a node's GPUs.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import faiss
import numpy as np
import scipy.sparse
import torch

CPU_SCRATCH_BYTES = 256 << 20
"""Room for one chunk's rows x centroids distances on the CPU."""

GPU_SCRATCH_SHARE = 0.25
"""Share of a GPU's free memory one chunk's distances may take."""


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
    """float64 (k, d) sums of the rows of ``x`` per label, on their device, accumulated in
    float32 as FAISS's own centroid update does (faiss/Clustering.cpp ``compute_centroids``).

    On the CPU as the product of a sparse k x n indicator matrix with the rows (scipy, one
    thread): torch's multi-threaded CPU ``index_add_`` took 50 times as long as one thread
    on the shared 2-core machines (121 ms against 2.4 ms for 20k x 256 rows). On a GPU,
    ``index_add_`` (atomic adds)."""
    if x.device.type != "cpu":
        return torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels, x).double()
    n = x.shape[0]
    indicator = scipy.sparse.csr_matrix(
        (np.ones(n, dtype=np.float32), (labels.numpy(), np.arange(n))), shape=(k, n))
    return torch.from_numpy(np.asarray(indicator @ x.numpy(), dtype=np.float64))


def faiss_cpu(x: np.ndarray) -> FaissAssign:
    return FaissAssign(x, faiss.IndexFlatL2(x.shape[1]), "faiss-cpu")


def replicated_flat_index(d: int, ngpu: int) -> faiss.Index:
    """An exact L2 index replicated on ``ngpu`` GPUs, float16 off; API as in
    faiss/python/gpu_wrappers.py ``index_cpu_to_all_gpus(index, co, ngpu)`` and
    ``GpuMultipleClonerOptions`` (faiss/gpu/GpuClonerOptions.h: ``shard``, ``useFloat16``)."""
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
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = False
    index = faiss.index_cpu_to_gpu(resources, gpu, faiss.IndexFlatL2(x.shape[1]), options)
    index.referenced_objects = [resources]
    return FaissAssign(x, index, f"faiss-gpu {gpu}")


def scratch_rows(device: torch.device, k: int) -> int:
    """Rows per chunk of :class:`TorchAssign`: the chunk's float32 distances to ``k``
    centroids (and its argmin) fit a share of the device's free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_SCRATCH_SHARE)
    else:
        budget = CPU_SCRATCH_BYTES
    return max(1, budget // (4 * (k + 2)))


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


class TorchAssign(Assigner):
    """Rows split into one contiguous part per device in ``devices`` (moved there once),
    assigned by chunked float32 GEMMs; every device's work is queued before any result is
    read, so several GPUs compute at once."""

    def __init__(self, x: np.ndarray, devices: Sequence[torch.device]) -> None:
        super().__init__(x)
        self.devices = [torch.device(d) for d in devices]
        bounds = np.linspace(0, self.x.shape[0], len(self.devices) + 1).astype(np.int64)
        self.parts = [torch.from_numpy(self.x[lo:hi]).to(dev)
                      for dev, lo, hi in zip(self.devices, bounds[:-1], bounds[1:])]
        self.norms = [(p * p).sum(dim=1) for p in self.parts]
        kinds = sorted({d.type for d in self.devices})
        self.name = f"torch {'/'.join(kinds)}" + (f" x{len(self.devices)}"
                                                 if len(self.devices) > 1 else "")

    def subset(self, positions: np.ndarray) -> "TorchAssign":
        return TorchAssign(self.x[positions], self.devices)

    def assign_to(self, centroids: np.ndarray, with_sums: bool) -> Assignment:
        k, d = centroids.shape
        with exact_float32_matmul():
            queued = [self._assign_part(part, norms, torch.from_numpy(centroids), with_sums)
                      for part, norms in zip(self.parts, self.norms)]
        labels = np.concatenate([lab.cpu().numpy() for lab, _, _ in queued]
                                or [np.empty(0, dtype=np.int64)])
        objective = float(sum(float(obj) for _, obj, _ in queued))
        sums = None
        if with_sums:
            sums = np.zeros((k, d))
            for _, _, part_sums in queued:
                sums += part_sums.cpu().numpy()
        return Assignment(labels, objective, np.bincount(labels, minlength=k), sums)

    @staticmethod
    def _assign_part(x: torch.Tensor, norms: torch.Tensor, centroids: torch.Tensor,
                     with_sums: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(labels, objective, sums) of the rows ``x`` on their device, left there."""
        c = centroids.to(x.device)
        c_norms = (c * c).sum(dim=1)
        labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        objective = torch.zeros((), dtype=torch.float64, device=x.device)
        step = scratch_rows(x.device, c.shape[0])
        for lo in range(0, x.shape[0], step):
            chunk = x[lo:lo + step]
            # ||x - c||^2 = ||x||^2 + ||c||^2 - 2 x.c; the row's own norm does not change
            # which centroid is nearest, so it is added after the argmin
            partial = torch.addmm(c_norms, chunk, c.T, beta=1.0, alpha=-2.0)
            nearest, assigned = partial.min(dim=1)
            del partial
            labels[lo:lo + chunk.shape[0]] = assigned
            objective += (nearest + norms[lo:lo + step]).clamp_min_(0).sum(dtype=torch.float64)
        return labels, objective, summed_by_label(x, labels, c.shape[0]) if with_sums else None
