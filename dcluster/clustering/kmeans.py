"""k-means of rows held by one process or spread over ranks: the engine (engine.py) over the
assignment backend the configuration and the machine call for (backend.py, assign.py).

Which backend runs where: FAISS (Johnson et al., the implementation the paper uses) on the
GPUs its build has code for, PyTorch's GEMM on GPUs FAISS cannot use (a P100, or a CPU-only
FAISS next to GPUs), FAISS on the CPU otherwise. Empty clusters are re-seeded by splitting
a large one (the paper's section 3.3 trick); the number of such splits is reported.
"""
from __future__ import annotations

import logging
from typing import Optional

import faiss
import numpy as np
import torch

from dcluster.clustering.assign import (Assigner, TorchAssign, as_points, faiss_cpu, faiss_gpu,
                                        faiss_gpus, replicated_flat_index)
from dcluster.clustering.backend import DEVICES, Backend, choose_backend
from dcluster.clustering.engine import Clustering, lloyd
from dcluster.parallel.collectives import Comm
from dcluster.parallel.hardware import detect

log = logging.getLogger(__name__)

__all__ = ["as_points", "available_gpus", "resolve_gpus", "flat_l2_index", "machine_backend",
           "assigner_for", "run_kmeans"]


def available_gpus() -> int:
    """GPUs FAISS can use: 0 for a CPU-only build (faiss-cpu has no StandardGpuResources)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def resolve_gpus(device: str) -> int:
    """How many GPUs FAISS uses for ``device`` ('auto' | 'cpu' | 'gpu'); 0 means CPU (for
    FAISS's other users: PIC's and the k-NN evaluation's flat indexes)."""
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


def flat_l2_index(d: int, ngpu: int) -> faiss.Index:
    """An exact L2 index on the CPU or replicated on ``ngpu`` GPUs (for PIC's and the k-NN
    evaluation's searches)."""
    return replicated_flat_index(d, ngpu) if ngpu else faiss.IndexFlatL2(d)


def machine_backend(backend: str = "auto", device: str = "auto") -> Backend:
    """:func:`choose_backend` for this machine's GPUs and FAISS build."""
    hw = detect()
    return choose_backend(backend, device, hw.gpus, hw.faiss, available_gpus())


def assigner_for(x: np.ndarray, backend: Backend,
                 own_device: Optional[torch.device] = None) -> Assigner:
    """The rows ``x`` behind ``backend``: on all of its GPUs (one process clustering every
    row), or with ``own_device``, a rank's device, on that one only (sharded mode: each rank
    assigns its own rows; on the CPU if the rank has no GPU)."""
    if own_device is not None and backend.gpus:
        if own_device.type != "cuda":
            backend = Backend(backend.kind, 0, backend.reason)
        elif backend.kind == "faiss":
            return faiss_gpu(x, own_device.index or 0)
        else:
            return TorchAssign(x, [own_device])
    if backend.kind == "faiss":
        return faiss_gpus(x, backend.gpus) if backend.gpus else faiss_cpu(x)
    devices = [torch.device("cuda", i) for i in range(backend.gpus)] or [torch.device("cpu")]
    return TorchAssign(x, devices)


def run_kmeans(x: np.ndarray, k: int, *, seed: int, niter: int = 20,
               max_points_per_centroid: int = 0, device: str = "auto",
               init: Optional[np.ndarray] = None, backend: str = "auto",
               comm: Optional[Comm] = None,
               own_device: Optional[torch.device] = None) -> Clustering:
    """Cluster the rows of ``x`` into ``k`` groups; with ``comm``, the union of every rank's
    rows (call on every rank; ``own_device`` is the rank's device, where its rows are
    assigned).

    ``max_points_per_centroid == 0`` trains on every point (the paper's setting), otherwise
    on a random k * max_points_per_centroid of them, as FAISS would by default. ``seed``
    seeds the initial centroids and the splits; callers vary it per epoch so that
    clusterings are not correlated through their initialisation. ``init`` (k, d), if given,
    replaces the random initial centroids (k-means++ seeds, say: see kmeanspp.py)."""
    x = as_points(x)
    if comm is None and x.shape[0] == 0:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for 0 points")
    chosen = machine_backend(backend, device)
    data = assigner_for(x, chosen, own_device)
    log.debug("k-means backend: %s (%s)", data.name, chosen.reason)
    return lloyd(data, k, niter=niter, seed=seed, comm=comm, init=init,
                 sample=k * max_points_per_centroid)
