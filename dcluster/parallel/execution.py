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

from dcluster.core.config import Config, ConfigError

log = logging.getLogger("dcluster.parallel.execution")

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
    capability = torch.cuda.get_device_capability(device) if on_gpu else None
    execution = resolve_execution(cfg.model.channels_last, cfg.optim.precision, device,
                                  capability)
    if on_gpu:
        enable_gpu_backends(device)
    log.info("passes on %s%s: precision %s, %s memory format", device,
             f" (sm_{capability[0]}{capability[1]})" if capability else "", execution.precision,
             "channels_last" if execution.channels_last else "contiguous (NCHW)")
    return execution


CHANNELS_LAST_FROM = 7  # Volta: the first tensor cores, which want NHWC
BF16_FROM = 8  # Ampere: the first GPUs with bf16 arithmetic (before it, torch emulates it)


def resolve_execution(channels_last: str, precision: str, device: torch.device,
                      capability: Optional[tuple[int, int]]) -> Execution:
    """The Execution for model.channels_last (auto | always | never) and optim.precision on
    ``device`` of compute ``capability`` (None off a GPU). ``auto`` turns NHWC on only where
    tensor cores use it (Volta and later; on Pascal it only costs layout conversions). bf16
    on a GPU without bf16 arithmetic (before Ampere) is refused: torch accepts it there and
    emulates it (torch.cuda.is_bf16_supported(including_emulation=True)), many times slower
    than float32. A pure function, so tests can describe any GPU."""
    major = capability[0] if capability else None
    if precision == "bf16" and major is not None and major < BF16_FROM:
        raise ConfigError(f"config key 'optim.precision' = 'bf16': this GPU (compute "
                          f"capability {major}.{capability[1]}) has no bf16 arithmetic (Ampere, "
                          "8.0, and later do); use fp16 or fp32")
    auto = major is not None and major >= CHANNELS_LAST_FROM
    nhwc = {"auto": auto, "always": True, "never": False}[channels_last]
    return Execution(device, precision, nhwc)


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
