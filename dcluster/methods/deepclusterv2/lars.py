"""LARS (You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks", 2017,
arXiv:1708.03888): SGD whose step for each weight tensor is scaled by a trust ratio, so that
a layer's update stays a fixed fraction of its weights whatever the batch and the layer's
gradient scale. DeepCluster-v2 trains at 4.8 x batch/256 with it (swav wraps SGD in
apex's ``LARC(optimizer, trust_coefficient=0.001, clip=False)``).

The update, as apex's LARC computes it (NVIDIA/apex apex/parallel/LARC.py ``step``) in its
scaling mode (``clip=False``), for a weight w with gradient g, weight decay wd, momentum m:

    ratio = eta * ||w|| / (||g|| + wd * ||w|| + eps)       (1 where ||w|| or ||g|| is 0,
    d = ratio * (g + wd * w)                                 and then no weight decay either)
    buf = m * buf + d        (buf = d at the first step, as torch's SGD)
    w = w - lr * buf

The LARS paper's local learning rate has this form, its weight decay inside. Unlike apex, which
applies it to every tensor, the tensors of a group marked ``lars=False`` (biases and
normalisation weights, :func:`lars_param_groups`) take neither the ratio nor weight decay,
as the LARS paper's successors do (SimCLR, BYOL): their norms say nothing of a layer's scale.

An ``torch.optim.Optimizer`` itself, not a wrapper, so that its ``state_dict`` (the momentum
buffers) checkpoints and resumes as SGD's does.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

EPS = 1e-8
"""apex LARC's ``eps`` in the ratio's denominator."""


class LARS(torch.optim.Optimizer):
    """SGD with momentum and weight decay, each tensor's step scaled by its trust ratio."""

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 0.001) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS needs lr, momentum, weight_decay >= 0 and eta > 0, got "
                             f"{lr}, {momentum}, {weight_decay}, {eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["lars"]:
                    d = self._trusted(p, d, group["eta"], group["weight_decay"])
                state = self.state[p]
                if group["momentum"] == 0:
                    buf = d
                elif "momentum_buffer" not in state:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf = state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss

    @staticmethod
    def _trusted(p: torch.Tensor, g: torch.Tensor, eta: float, wd: float) -> torch.Tensor:
        """``ratio * (g + wd * p)``, or ``g`` where ``p`` or ``g`` is zero; on the device,
        without reading the norms back (a host sync per tensor would stall a GPU step)."""
        w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
        trusted = (w_norm > 0) & (g_norm > 0)
        ratio = torch.where(trusted, eta * w_norm / (g_norm + wd * w_norm + EPS),
                            torch.ones_like(w_norm))
        return (g + (wd * trusted) * p) * ratio


def lars_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in two groups: tensors of two or more
    dimensions (conv and linear weights) under LARS, and 1-D ones (biases, BatchNorm's
    weights and biases) with ``lars=False`` and no weight decay. Frozen parameters
    (DeepCluster-v2's prototypes, the Sobel filters) are left out."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim > 1]},
              {"params": [p for p in trainable if p.ndim <= 1], "lars": False,
               "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
