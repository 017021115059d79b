"""Which assignment backend the k-means engine uses, and why: a pure function of the
configuration and the described hardware, so that it is tested for machines this one is not.

``clustering.backend``:

* ``auto``: FAISS on the GPUs where its build has code for them; PyTorch on GPUs FAISS
  cannot use (a P100, for which no FAISS wheel has code, or GPUs next to a CPU-only FAISS
  build); FAISS on the CPU where no GPU is used.
* ``faiss``: FAISS, on the GPUs if it can use them, else on the CPU.
* ``torch``: PyTorch's GEMM on the GPUs, or on the CPU without one.

``clustering.device`` (auto | cpu | gpu) still says where: ``cpu`` keeps k-means on the CPU,
``gpu`` makes it an error when no backend can use the GPUs.

PIC's k-NN graph searches with FAISS flat indexes only (:func:`search_backend`): on the GPUs where FAISS's build has code for every one of them, on
the CPU otherwise. A FAISS GPU index on a GPU its build has no code for (a P100 under FAISS
1.15.1's sm_70+ wheel) is not a Python error but a kernel abort: ``StandardGpuResources``
only checks compute capability >= 3.0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dcluster.core.errors import UserError
from dcluster.parallel.hardware import GPU, Build

BACKENDS = ("auto", "faiss", "torch")
DEVICES = ("auto", "cpu", "gpu")


class BackendError(UserError, RuntimeError):
    """clustering.device=gpu where no backend can use a GPU: the CLI's exit 2, raised at
    start-up (dcluster/train.py) before any compute."""


@dataclass(frozen=True)
class Backend:
    kind: str  # faiss | torch
    gpus: int  # GPUs it assigns on (0: the CPU)
    reason: str  # one line for the log and `dcluster info`

    @property
    def label(self) -> str:
        where = f"{self.gpus} GPU(s)" if self.gpus else "the CPU"
        return f"{'FAISS' if self.kind == 'faiss' else 'PyTorch'} on {where}"


def choose_backend(backend: str, device: str, gpus: Sequence[GPU], faiss_build: Build,
                   faiss_gpus: int) -> Backend:
    """The backend for ``clustering.backend`` and ``clustering.device`` on a node whose torch
    sees ``gpus``, with FAISS installed as ``faiss_build`` seeing ``faiss_gpus`` GPUs (0 for a
    CPU-only build)."""
    if backend not in BACKENDS:
        raise ValueError(f"clustering backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device not in DEVICES:
        raise ValueError(f"clustering device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return Backend("torch" if backend == "torch" else "faiss", 0, "clustering.device=cpu")
    problem = faiss_gpu_problem(gpus, faiss_build, faiss_gpus)
    if backend != "torch" and not problem:
        return Backend("faiss", faiss_gpus, f"the FAISS build ({faiss_build.name}) has code "
                                            f"for the {faiss_gpus} GPU(s)")
    if gpus and backend != "faiss":
        return Backend("torch", len(gpus), problem or "clustering.backend=torch")
    if device == "gpu":
        raise BackendError(
            "clustering device 'gpu' was requested but "
            + ("no GPU is visible" if not gpus and not faiss_gpus else
               f"the FAISS build ({faiss_build.name}) cannot use the GPUs; set "
               "clustering.backend=auto or torch to cluster on them with PyTorch"))
    if backend == "torch":
        return Backend("torch", 0, "no GPU is visible")
    return Backend("faiss", 0, "no GPU FAISS can use" + ("" if not gpus else
                   f" (clustering.backend=faiss with {faiss_build.name})"))


def faiss_gpu_problem(gpus: Sequence[GPU], faiss_build: Build, faiss_gpus: int) -> str:
    """Why FAISS cannot use the GPUs (for the log and `dcluster info`); "" when it can."""
    if faiss_gpus == 0:
        return (f"FAISS is a CPU-only build ({faiss_build.name})" if gpus
                else "no GPU is visible")
    unusable = [g for g in gpus if faiss_build.runs_on(g.capability) is False]
    if unusable:
        g = unusable[0]
        return (f"the FAISS build ({faiss_build.name}) has no code for GPU {g.index} "
                f"({g.name}, compute capability {g.capability // 10}.{g.capability % 10})")
    return ""


def search_backend(device: str, gpus: Sequence[GPU], faiss_build: Build,
                   faiss_gpus: int) -> Backend:
    """Where FAISS's flat searches (PIC's k-NN graph, the k-NN evaluation) run for
    ``clustering.device`` on a node whose torch sees ``gpus``: FAISS's GPUs only where its
    build has code for every one, else the CPU (``device`` gpu: an error naming why)."""
    if device not in DEVICES:
        raise ValueError(f"clustering device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return Backend("faiss", 0, "clustering.device=cpu")
    problem = faiss_gpu_problem(gpus, faiss_build, faiss_gpus)
    if not problem:
        return Backend("faiss", faiss_gpus, f"the FAISS build ({faiss_build.name}) has code "
                                            f"for the {faiss_gpus} GPU(s)")
    if device == "gpu":
        raise BackendError(f"clustering device 'gpu' was requested but {problem}; use device "
                           "'auto' or 'cpu', or install a FAISS build with code for the GPUs")
    return Backend("faiss", 0, problem)


def backend_rows(backend: str, device: str, gpus: Sequence[GPU], faiss_build: Build,
                 faiss_gpus: int) -> list[tuple[str, str]]:
    """What runs each of the project's nearest-centroid and nearest-neighbour searches on
    this hardware, and why: k-means (every k-means: the stage, the probe, ``eval
    clusters``), the k-NN evaluation (PyTorch GEMMs on each rank's device,
    dcluster/evaluation/knn.py) and PIC's graph (FAISS). For the start-up log and `dcluster
    info`, so that a user sees before an epoch where FAISS would not run."""
    kmeans = choose_backend(backend, device, gpus, faiss_build, faiss_gpus)
    search = search_backend(device, gpus, faiss_build, faiss_gpus)
    on_gpu = bool(gpus) and device != "cpu"
    return [("k-means backend", f"{kmeans.label}: {kmeans.reason}"),
            ("k-NN backend", "PyTorch on each rank's " + ("GPU" if on_gpu else "CPU")
             + ": GEMMs against the rank's bank shard, whatever FAISS's build"),
            ("PIC backend", f"{search.label} (its k-NN graph; the power iterations on the "
                            f"CPU): {search.reason}")]
