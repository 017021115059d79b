"""How the feature and training passes run on the rank's device: the autocast dtype, the
memory format of images and weights, and the backend switches a GPU wants.

One object, resolved once from the config and the device, so that every pass (DeepCluster's,
MMDC's, the evaluation's feature passes) runs the same way and the CPU tests cover the same
code a GPU runs: bf16 autocast works on the CPU too; only channels_last, TF32 and
cudnn.benchmark default to on just where a GPU makes them pay.
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from dcluster.config import Config

log = logging.getLogger("dcluster.execution")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Execution:
    device: torch.device
    precision: str = "fp32"  # fp32 | bf16 | fp16: the autocast dtype of forward passes
    channels_last: bool = False  # NHWC images and conv weights (tensor-core friendly)

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def autocast(self) -> AbstractContextManager:
        """Mixed precision for a forward pass (and the loss): matmuls and convolutions in the
        low precision, reductions and losses in float32 as autocast's op lists decide."""
        return torch.autocast(self.device.type, dtype=self.dtype,
                              enabled=self.precision != "fp32")

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch of images on the device, in the memory format the model's weights use.
        non_blocking: from pinned memory the copy overlaps the GPU's work."""
        if self.channels_last:
            return batch.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(self.device, non_blocking=True)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model on the device in this memory format (a head made later follows the
        format of what it is given: a Linear layer has no spatial layout)."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler
        is then disabled: its state is empty and its calls pass through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def execution_for(cfg: Config, device: torch.device) -> Execution:
    """The config's choices on this device, with the GPU backend switches set (once per
    process: they are global to torch)."""
    on_gpu = device.type == "cuda"
    channels_last = {"auto": on_gpu, "always": True, "never": False}[cfg.model.channels_last]
    if on_gpu:
        enable_gpu_backends(device)
    execution = Execution(device, cfg.optim.precision, channels_last)
    log.info("passes on %s: precision %s, %s memory format", device, execution.precision,
             "channels_last" if channels_last else "contiguous (NCHW)")
    return execution


def enable_gpu_backends(device: torch.device) -> None:
    """TF32 for float32 matmuls and convolutions where the GPU has it (Ampere and later: the
    mantissa DeepCluster's float32 passes lose is below SGD's noise), and cuDNN's autotuner
    (the input shape is fixed for a whole pass, so its first-batch search pays off)."""
    major, _ = torch.cuda.get_device_capability(device)
    tf32 = major >= 8
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    log.info("GPU %s (sm_%d): TF32 %s, cudnn.benchmark on", torch.cuda.get_device_name(device),
             major * 10 + torch.cuda.get_device_capability(device)[1], "on" if tf32 else "off")


def fused_optimizer_kwargs(device: torch.device) -> dict[str, bool]:
    """torch's fused SGD (one kernel for all parameters) on a GPU. On the CPU the default
    per-parameter loop stays, so CPU runs keep the numbers they always had."""
    return {"fused": True} if device.type == "cuda" else {}


def peak_gpu_memory_gb(device: torch.device) -> Optional[float]:
    """This process's peak allocated GPU memory since the last call (the counter is reset),
    or None off the GPU."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak
