"""FAISS k-means (Johnson et al., the implementation the paper uses), on CPU or on all GPUs.

The GPU and CPU runs share one code path: only the flat index that assigns points to centroids
differs (see :func:`flat_l2_index`). FAISS re-seeds empty clusters during training by splitting
a large one (the paper's section 3.3 trick); the number of such splits is reported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import faiss
import numpy as np

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")


def available_gpus() -> int:
    """GPUs FAISS can use: 0 for a CPU-only build (faiss-cpu has no StandardGpuResources)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def resolve_gpus(device: str) -> int:
    """How many GPUs to use for ``device`` ('auto' | 'cpu' | 'gpu'); 0 means CPU."""
    if device not in DEVICES:
        raise ValueError(f"clustering device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return 0
    ngpu = available_gpus()
    if device == "gpu" and ngpu == 0:
        why = ("no GPU is visible" if hasattr(faiss, "StandardGpuResources")
               else "the installed faiss is a CPU-only build (faiss-cpu)")
        raise RuntimeError(f"clustering device 'gpu' was requested but {why}; "
                           "use device 'auto' or 'cpu', or install faiss-gpu")
    return ngpu


def backend_name(ngpu: int) -> str:
    return f"faiss-gpu x{ngpu} (replicated)" if ngpu else "faiss-cpu"


def flat_l2_index(d: int, ngpu: int) -> faiss.Index:
    """An exact L2 index on the CPU or replicated on ``ngpu`` GPUs.

    Replicas rather than shards: every GPU holds all centroids (k x 256 floats is small) and
    assigns its 1/ngpu share of the points, so no per-query merge of partial results is needed.
    float16 is off so that GPU and CPU assignments agree."""
    index = faiss.IndexFlatL2(d)
    if ngpu == 0:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = False
    options.useFloat16 = False
    return faiss.index_cpu_to_all_gpus(index, co=options, ngpu=ngpu)


def as_points(x: np.ndarray) -> np.ndarray:
    """``x`` as the C-contiguous float32 (N, d) array FAISS needs, checked to be finite."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"points must be a non-empty (N, d) array, got shape {x.shape}")
    finite = np.isfinite(x)
    if not finite.all():
        raise ValueError(f"points contain {x.size - int(finite.sum())} non-finite values "
                         f"(NaN or inf) in {int((~finite.all(axis=1)).sum())} rows")
    return x


@dataclass
class KMeansResult:
    labels: np.ndarray  # int64 (N,): nearest final centroid of every point
    # sum over all points of the squared distance to their final centroid (that of their
    # label), as sharded k-means reports it; not FAISS's last loss, which is that of the
    # centroids before their last update, and of its training sample when FAISS subsamples
    objective: float
    sizes: np.ndarray  # int64 (k,)
    n_empty: int  # clusters no point is assigned to in the final assignment
    n_reseeded: int  # empty clusters FAISS re-seeded by splitting, over all iterations
    backend: str


def run_kmeans(x: np.ndarray, k: int, *, seed: int, niter: int = 20,
               max_points_per_centroid: int = 0, device: str = "auto",
               init: Optional[np.ndarray] = None) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` groups.

    ``max_points_per_centroid == 0`` trains on every point (the paper's setting): FAISS would
    otherwise silently train on a random k * 256 subset. ``seed`` is taken modulo 2**31 (FAISS
    stores it as a C int); callers vary it per epoch so that clusterings are not correlated
    through their initialisation. ``init`` (k, d), if given, replaces FAISS's random seeds
    (k-means++ seeds, say: see kmeanspp.py).
    """
    x = as_points(x)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    if niter < 1:
        raise ValueError(f"k-means needs at least one iteration, got niter={niter}")
    ngpu = resolve_gpus(device)
    clus = faiss.Clustering(d, k)
    clus.niter = niter
    clus.seed = seed % 2**31
    clus.max_points_per_centroid = max_points_per_centroid or -(-n // k)
    clus.min_points_per_centroid = 1  # FAISS only warns below this; k <= n is checked above
    if n > k * clus.max_points_per_centroid:
        log.info("k-means trains on a sample of %d of the %d points",
                 k * clus.max_points_per_centroid, n)
    if init is not None:
        faiss.copy_array_to_vector(as_points(init).ravel(), clus.centroids)
    index = flat_l2_index(d, ngpu)
    log.debug("k-means on %s: %d points x %d dims, k=%d, %d iterations",
              backend_name(ngpu), n, d, k, niter)
    clus.train(x, index)
    distances, assign = index.search(x, 1)  # the index holds the final centroids
    stats = clus.iteration_stats
    stats = [stats.at(i) for i in range(stats.size())]
    labels = assign.ravel().astype(np.int64, copy=False)
    sizes = np.bincount(labels, minlength=k)
    return KMeansResult(
        labels=labels,
        objective=float(distances.sum(dtype=np.float64)),
        sizes=sizes,
        n_empty=int((sizes == 0).sum()),
        n_reseeded=int(sum(s.nsplit for s in stats)),
        backend=backend_name(ngpu),
    )
