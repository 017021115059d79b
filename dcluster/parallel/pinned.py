"""Page-locked host buffers of exactly the size asked for, unlocked when released.

A GPU copies into host memory without waiting only if that memory is page-locked. torch's
``pin_memory=True`` takes it from its caching host allocator, which rounds every block up to
the next power of two and keeps freed blocks for reuse, never returning them to the system
(torch 2.14.1, include/ATen/core/CachingHostAllocator.h, ``allocate``, line 342:
``return c10::llvm::PowerOf2Ceil(size)`` unless PYTORCH_CUDA_ALLOC_CONF's
pinned_max_round_threshold says otherwise, and ``free`` puts the block back on the free list,
line 847): a 2.6 GB outbox pins 4 GiB per rank, 32 GiB on an 8-GPU node, for the rest of the
run. So the feature bank's outbox is ordinary host memory registered with the driver at its
exact size (``cudaHostRegister``, as torch's own checkpoint stager does it:
torch/cuda/_pin_memory_utils.py), and unregistered when the pass is over.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

CUDA_HOST_REGISTER_PORTABLE = 1  # page-locked for every CUDA context, as torch registers it


class PinnedBuffer:
    """A host tensor, page-locked (if ``pin``) until :meth:`release`. ``runtime``: the CUDA
    runtime bindings (``torch.cuda.cudart()`` by default)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool,
                 runtime: Optional[Any] = None) -> None:
        self.tensor: Optional[torch.Tensor] = torch.empty(shape, dtype=dtype)
        self._runtime = None
        nbytes = self.tensor.numel() * self.tensor.element_size()
        if pin and nbytes:
            runtime = runtime or torch.cuda.cudart()
            error = int(runtime.cudaHostRegister(self.tensor.data_ptr(), nbytes,
                                                 CUDA_HOST_REGISTER_PORTABLE))
            if error:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: cudaError {error}")
            self._runtime = runtime

    def release(self) -> None:
        """Unlock the pages (the GPU must be done copying into them) and drop the tensor."""
        if self._runtime is not None:
            self._runtime.cudaHostUnregister(self.tensor.data_ptr())
            self._runtime = None
        self.tensor = None
