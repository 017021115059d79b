"""The GPU memory a configuration's passes need, estimated from the network's shapes alone.

A preset written for ImageNet is run on cards nobody here has (issue #31, item 7: the VGG16 and
ResNet-50 presets trained in fp32 at batch 256 per process, which no 16 GB P100/V100 holds).
The network is built on torch's ``meta`` device, where tensors have shapes and dtypes but no
storage, and run forward once at batch 1 and once at batch 2: the tensors autograd saves for
the backward pass (``torch.autograd.graph.saved_tensors_hooks``) are the training pass's
activation memory, and their growth from 1 to 2 images is the cost of one image (the weights
some operations save are in both counts and drop out). Each saved tensor is counted once,
however many operations save it. Checked against the same count on real CPU tensors
(deduplicated by storage): equal for AlexNet and ResNet-50.

What it leaves out, covered by :data:`RUNTIME_BYTES`: the CUDA context, cuDNN's and cuBLAS's
workspaces and the caching allocator's fragmentation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from dcluster.core.batch import plan_batch
from dcluster.models import build_model

if TYPE_CHECKING:
    from dcluster.core.config import Config

GIB = 2**30
RUNTIME_BYTES = 3 * GIB // 2
"""CUDA context, library workspaces and allocator slack: an allowance, not a measurement."""

# per parameter: float32 weight, gradient and SGD momentum, and under autocast its cached
# low-precision copy
STATE_BYTES = {"fp32": 12, "bf16": 14, "fp16": 14}


@dataclass(frozen=True)
class PassMemory:
    """Bytes one process's GPU holds at the peak of each pass."""
    training: int  # the training step at optim.batch_size
    features: int  # the clustering feature pass at extract.batch_size (no autograd)
    precision: str

    @property
    def peak(self) -> int:
        return max(self.training, self.features)

    def fits(self, card_bytes: int) -> bool:
        return self.peak <= card_bytes


def _on_meta(cfg: "Config", dtype: torch.dtype) -> nn.Module:
    """The configured network with its k-way head, on the meta device in ``dtype``."""
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.data.crop_size)
        model.head = nn.Linear(model.feature_dim, cfg.clustering.k)
    return model.to(dtype)


def _meta_images(batch: int, crop: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(batch, 3, crop, crop, device="meta", dtype=dtype)


def saved_bytes(model: nn.Module, batch: int, crop: int, dtype: torch.dtype) -> int:
    """Bytes of the tensors a training forward of ``batch`` images saves for backward."""
    saved: dict[int, tuple[torch.Tensor, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = (t, t.numel() * t.element_size())  # the reference keeps id(t) unique
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(_meta_images(batch, crop, dtype))
    return sum(size for _, size in saved.values())


def inference_bytes_per_image(model: nn.Module, crop: int, dtype: torch.dtype) -> int:
    """The largest input plus output of one layer, per image, without autograd: what the
    feature pass holds at once."""
    peak = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal peak
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        peak = max(peak, sum(t.numel() * t.element_size() for t in tensors))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model.eval().clustering_features(_meta_images(1, crop, dtype))
    finally:
        for handle in handles:
            handle.remove()
    return peak


def estimate(cfg: "Config", world_size: int = 1) -> PassMemory:
    """The per-process peak of ``cfg``'s training and feature passes on a GPU, with
    ``world_size`` processes sharing optim.global_batch (when set)."""
    precision = cfg.optim.precision
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = _on_meta(cfg, dtype)
    crop = cfg.data.crop_size
    per_image = saved_bytes(model, 2, crop, dtype) - saved_bytes(model, 1, crop, dtype)
    state = STATE_BYTES[precision] * sum(p.numel() for p in model.parameters())
    weights = 4 * sum(p.numel() for p in model.parameters())
    features = cfg.extract.batch_size * inference_bytes_per_image(model, crop, dtype)
    batch = plan_batch(cfg.optim, world_size).per_process
    return PassMemory(training=batch * per_image + state + RUNTIME_BYTES,
                      features=features + weights + RUNTIME_BYTES, precision=precision)
