"""Optimisers and one epoch of supervised training on the pseudo-labels."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dcluster.config import OptimConfig
from dcluster.data import Pipelines, num_batches
from dcluster.logs import progress
from dcluster.models import DeepClusterNet


def sgd(params, cfg: OptimConfig, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def body_optimizer(model: DeepClusterNet, cfg: OptimConfig, lr: float) -> torch.optim.SGD:
    """Everything trainable except the head: its momentum carries over from epoch to epoch."""
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and not name.startswith("head.")]
    return sgd(params, cfg, lr)


@dataclass
class TrainStats:
    loss: float  # mean cross-entropy over the epoch's images
    images: int


def train_one_epoch(model: DeepClusterNet, pipelines: Pipelines, order: Sequence[int], labels: np.ndarray,
                    epoch: int, batch_size: int, optimizers: Sequence[torch.optim.Optimizer],
                    device: torch.device, progress_mode: str, show: bool) -> TrainStats:
    model.train()
    criterion = nn.CrossEntropyLoss()
    total, seen = 0.0, 0
    batches = pipelines.train_batches(order, labels, epoch, batch_size)
    for batch in progress(batches, num_batches(len(order), batch_size), "train",
                          progress_mode, show):
        images = batch.images.to(device, non_blocking=True)
        targets = batch.targets.to(device, non_blocking=True)
        loss = criterion(model(images), targets)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"epoch {epoch}: training loss became {value}; lower optim.lr ({optimizers[0].defaults['lr']})")
        total += value * images.shape[0]
        seen += images.shape[0]
    return TrainStats(loss=total / max(seen, 1), images=seen)
