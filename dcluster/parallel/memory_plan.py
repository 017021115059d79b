"""Where a rank's feature rows live: on its GPU when they fit, otherwise in host memory.

The feature pass's rows (N/R x D float32 per rank) and the feature bank's (N/R x D in the
bank's dtype) can be larger than a GPU: the paper's single-GPU ImageNet run holds 1.28M x
4096 float32 = 21 GB of them, more than a 16 GB P100. :func:`place_rows` decides from the
numbers alone (a pure function, so tests can describe any GPU and any scale); the rows go to
the GPU only when they take at most :data:`GPU_FRACTION` of what the GPU has free beyond the
pass's working set. Otherwise they stay in this rank's host memory and the clustering stage
streams them to the GPU a chunk at a time (the PCA statistics and the projection run there,
dcluster/clustering/distributed_stage.py), so only a chunk and the D x D statistics occupy
the GPU. Host rows are ordinary (pageable) memory: pinning tens of GB per rank would lock
them out of the node's page cache, and torch's caching host allocator rounds a pinned
block up to a power of two (see dcluster/parallel/pinned.py). Rows that fit neither are a UserError
before the pass, naming the numbers.

:func:`measure` reads the numbers on a real GPU (``torch.cuda.mem_get_info``, what torch's
own allocator holds unused, /proc/meminfo); everything else is arithmetic.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from dcluster.core.errors import UserError

log = logging.getLogger(__name__)

GPU_FRACTION = 0.8
"""The share of the GPU memory free beyond the working set that rows may take: the rest
absorbs the allocator's fragmentation and what the working set's estimate misses."""

WORKING_SET = 4 << 30
"""GPU bytes kept for the work next to the rows: the eval forward of a 256-image AlexNet
batch with cuDNN's workspace (about 2 GB at 224 px), the clustering stage's D x D float64
statistics (134 MB at D = 4096) and its chunks, rank 0's gathered N x 256 rows for FAISS
(1.3 GB for ImageNet)."""

GB = 1e9


class MemoryPlanError(UserError):
    """Rows that fit neither the GPU nor this rank's share of host memory."""


@dataclass(frozen=True)
class Memory:
    """What this rank can use, in bytes."""
    gpu_free: int  # on its GPU: free per the driver plus what torch's allocator holds unused
    gpu_total: int
    host_available: int  # its share of the node's available host memory


@dataclass(frozen=True)
class Placement:
    """The decision for one matrix of rows, with the numbers it was taken from."""
    what: str
    rows: int
    dim: int
    itemsize: int
    device: torch.device  # where the rows live
    gpu_budget: int  # the GPU bytes the rows could have taken (0 without a GPU)
    gpu_free: int = 0  # the numbers the budget came from
    working_set: int = 0

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * self.itemsize

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        size = (f"{self.what}: {self.rows} x {self.dim} x {self.itemsize} B = "
                f"{self.nbytes / GB:.2f} GB")
        if not self.gpu_budget:
            return f"{size} on {self.device}"
        return (f"{size} {'on the GPU' if self.on_gpu else 'in host memory, streamed to the GPU'}"
                f" ({'within' if self.on_gpu else 'above'} the GPU budget of "
                f"{self.gpu_budget / GB:.2f} GB = {GPU_FRACTION:g} x ({self.gpu_free / GB:.2f} GB "
                f"free - {self.working_set / GB:.2f} GB working set))")


def place_rows(what: str, rows: int, dim: int, itemsize: int, device: torch.device,
               memory: Optional[Memory], working_set: int = WORKING_SET) -> Placement:
    """Where ``rows`` x ``dim`` values of ``itemsize`` bytes live for a rank on ``device``
    with ``memory`` (None off a GPU: the rows are where the device is, its host memory)."""
    if device.type != "cuda" or memory is None:
        return Placement(what, rows, dim, itemsize, device, 0)
    budget = int(GPU_FRACTION * max(0, memory.gpu_free - working_set))
    on_gpu = rows * dim * itemsize <= budget
    placement = Placement(what, rows, dim, itemsize, device if on_gpu else torch.device("cpu"),
                          budget, memory.gpu_free, working_set)
    if not on_gpu and placement.nbytes > memory.host_available:
        raise MemoryPlanError(
            f"{placement.describe()}: this rank's share of host memory is only "
            f"{memory.host_available / GB:.2f} GB; run on more ranks (each holds N / ranks "
            "rows), or store the bank in bfloat16 (clustering.bank.dtype)")
    return placement


def measure(device: torch.device, environ: Mapping[str, str] = os.environ) -> Optional[Memory]:
    """This rank's numbers on its GPU now (None off a GPU). Memory torch's caching allocator
    reserved but does not use counts as free: the rows' allocation would reuse it."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return Memory(gpu_free=free + unused, gpu_total=total,
                  host_available=host_available() // local_ranks(environ))


def host_available(meminfo: str = "/proc/meminfo") -> int:
    """The node's available host memory (MemAvailable: free plus reclaimable cache)."""
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no MemAvailable line in {meminfo}")


def local_ranks(environ: Mapping[str, str]) -> int:
    """How many ranks share this node's host memory: torchrun's LOCAL_WORLD_SIZE, Slurm's
    tasks per node (``8`` or ``8(x2)``), else 1."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = environ.get(key, "").split("(")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


# Per kind of rows, the last decision logged at INFO: the plan runs every epoch, and a line per
# epoch that repeats the same decision buries the epoch lines, so a repeat goes to DEBUG.
_logged_decisions: dict[str, tuple[int, int, int, str]] = {}


def plan(what: str, rows: int, dim: int, itemsize: int, device: torch.device) -> Placement:
    """:func:`place_rows` with this rank's measured numbers, logged at INFO when the decision
    (shape, where the rows live) differs from the last one logged for ``what``."""
    placement = place_rows(what, rows, dim, itemsize, device, measure(device))
    decision = (rows, dim, itemsize, str(placement.device))
    repeated = _logged_decisions.get(what) == decision
    _logged_decisions[what] = decision
    log.log(logging.DEBUG if repeated else logging.INFO, "memory plan: %s", placement.describe())
    return placement
