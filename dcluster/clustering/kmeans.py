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

import numpy as np
import torch

from dcluster.core.faiss_after_torch import faiss
from dcluster.clustering.assign import (Assigner, TorchAssign, as_points, faiss_cpu, faiss_gpu,
                                        faiss_gpus, replicated_flat_index)
from dcluster.clustering.backend import (DEVICES, Backend, backend_rows, choose_backend,
                                         search_backend)
from dcluster.clustering.engine import Clustering, lloyd
from dcluster.parallel.collectives import Comm
from dcluster.parallel.hardware import detect

log = logging.getLogger(__name__)

__all__ = ["as_points", "available_gpus", "resolve_gpus", "flat_l2_index", "machine_backend",
           "resolve_backend", "machine_backend_rows", "assigner_for", "run_kmeans"]


def available_gpus() -> int:
    """GPUs FAISS can use: 0 for a CPU-only build (faiss-cpu has no StandardGpuResources)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def resolve_gpus(device: str) -> int:
    """How many GPUs FAISS's flat searches use for ``device`` ('auto' | 'cpu' | 'gpu'); 0
    means the CPU (PIC's k-NN graph). 0 too where FAISS's build has no
    code for a GPU torch sees (:func:`search_backend`): there it would abort in a kernel."""
    if device not in DEVICES:
        raise ValueError(f"clustering device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return 0
    hw = detect()
    chosen = search_backend(device, hw.gpus, hw.faiss, available_gpus())
    log.debug("FAISS searches on %s (%s)", chosen.label, chosen.reason)
    return chosen.gpus


def flat_l2_index(d: int, ngpu: int) -> faiss.Index:
    """An exact L2 index on the CPU or replicated on ``ngpu`` GPUs (for PIC's searches)."""
    return replicated_flat_index(d, ngpu) if ngpu else faiss.IndexFlatL2(d)


def machine_backend(backend: str = "auto", device: str = "auto") -> Backend:
    """:func:`choose_backend` for this machine's GPUs and FAISS build: a detection of the
    hardware and of FAISS's build, which a run does once (DeepCluster's method) and then
    passes the :class:`Backend` down."""
    hw = detect()
    return choose_backend(backend, device, hw.gpus, hw.faiss, available_gpus())


def resolve_backend(backend: str | Backend, device: str = "auto") -> Backend:
    """``backend`` as it is when already chosen (a run's, resolved once: ``device`` is in it
    then), else :func:`machine_backend` for ``clustering.backend`` and ``device``."""
    return backend if isinstance(backend, Backend) else machine_backend(backend, device)


def machine_backend_rows(backend: str = "auto", device: str = "auto") -> list[tuple[str, str]]:
    """:func:`backend_rows` (k-means, k-NN, PIC) for this machine's GPUs and FAISS build."""
    hw = detect()
    return backend_rows(backend, device, hw.gpus, hw.faiss, available_gpus())


def assign_devices(backend: Backend, own_device: Optional[torch.device],
                   node_gpus: bool) -> list[torch.device]:
    """Where ``backend`` assigns; [] for the CPU. A process assigns on its own GPU
    (``own_device``; the current CUDA device when not given) and never on its peers': on a
    node of several ranks the others' GPUs hold their own training state. ``node_gpus``
    (``clustering.gpus=node``, one process clustering every row in gather mode while its
    peers wait) asks for every GPU of the backend."""
    if not backend.gpus:
        return []
    if node_gpus:
        return [torch.device("cuda", i) for i in range(backend.gpus)]
    if own_device is None:
        return [torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available()
                             else 0)]
    return [own_device] if own_device.type == "cuda" else []


def assigner_for(x: np.ndarray, backend: Backend, own_device: Optional[torch.device] = None,
                 node_gpus: bool = False) -> Assigner:
    """The rows ``x`` behind ``backend`` on the devices :func:`assign_devices` names."""
    devices = assign_devices(backend, own_device, node_gpus)
    if backend.kind == "faiss":
        if not devices:
            return faiss_cpu(x)
        return faiss_gpus(x, len(devices)) if node_gpus else faiss_gpu(x, devices[0].index or 0)
    return TorchAssign(x, devices or [torch.device("cpu")])


def run_kmeans(x: np.ndarray, k: int, *, seed: int, niter: int = 20,
               max_points_per_centroid: int = 0, device: str = "auto",
               init: Optional[np.ndarray] = None, backend: str | Backend = "auto",
               comm: Optional[Comm] = None, own_device: Optional[torch.device] = None,
               node_gpus: bool = False) -> Clustering:
    """Cluster the rows of ``x`` into ``k`` groups; with ``comm``, the union of every rank's
    rows (call on every rank). ``own_device`` is the process's device, where its rows are
    assigned; ``node_gpus`` spreads them over the node's GPUs instead (:func:`assign_devices`).

    ``max_points_per_centroid == 0`` trains on every point (the paper's setting), otherwise
    on a random k * max_points_per_centroid of them, as FAISS would by default. ``seed``
    seeds the initial centroids and the splits; callers vary it per epoch so that
    clusterings are not correlated through their initialisation. ``init`` (k, d), if given,
    replaces the random initial centroids (k-means++ seeds, say: see kmeanspp.py).
    ``backend`` is ``clustering.backend`` (chosen for ``device`` on this machine at each
    call) or an already chosen :class:`Backend`, used as it is (:func:`resolve_backend`)."""
    x = as_points(x)
    if comm is None and x.shape[0] == 0:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for 0 points")
    chosen = resolve_backend(backend, device)
    data = assigner_for(x, chosen, own_device, node_gpus)
    log.debug("k-means backend: %s (%s)", data.name, chosen.reason)
    return lloyd(data, k, niter=niter, seed=seed, comm=comm, init=init,
                 sample=k * max_points_per_centroid)
