"""The linear probe of DeepCluster's section 4.3 (after Zhang et al., 2017): a linear
classifier on a frozen conv layer.

The layer's activations are average-pooled to about `pooled_dim` values (9,000 in the paper:
e.g. AlexNet's conv5, 256 x 13 x 13, pooled to 256 x 6 x 6 = 9,216), batch-normalised without
affine parameters (so that one learning rate suits every layer, whatever its activation
scale), and fed to one linear layer trained by SGD with a cosine schedule on augmented crops.
Pooling is adaptive, to the square side that comes closest to `pooled_dim`, so the same rule
gives the reference's sizes on AlexNet and sensible ones on any other network.

In a job of several processes the probe trains with DDP, as the network did: every rank feeds
its own slice of each epoch's order, gradients are averaged, so the ranks share the work of
the (many) epochs instead of waiting for rank 0.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcluster.parallel.collectives import Comm
from dcluster.core.config import LinearEvalConfig
from dcluster.parallel.distributed import Env
from dcluster.runtime.optimize import align_replicas, data_parallel

log = logging.getLogger("dcluster.eval")

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (activations (B, C, H, W), labels)


def pooled_side(channels: int, size: int, pooled_dim: int) -> int:
    """The side s of the s x s average pool that brings channels * s * s closest to
    ``pooled_dim``, never above the map's own ``size``."""
    return max(1, min(size, round(math.sqrt(pooled_dim / channels))))


class LinearProbe(nn.Module):
    def __init__(self, channels: int, size: int, pooled_dim: int, n_classes: int) -> None:
        super().__init__()
        side = pooled_side(channels, size, pooled_dim)
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.dim = channels * side * side
        self.norm = nn.BatchNorm1d(self.dim, affine=False)
        self.linear = nn.Linear(self.dim, n_classes)
        with torch.no_grad():
            self.linear.weight.normal_(0.0, 0.01)
            self.linear.bias.zero_()

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(self.pool(activations).flatten(1)))


def train_probe(probe: LinearProbe, batches: Callable[[int], Batches],
                cfg: LinearEvalConfig, env: Env, comm: Comm) -> list[float]:
    """Train for cfg.epochs (``batches(epoch)`` yields this rank's data of that epoch, as many
    batches on every rank); returns the mean loss of each epoch over all ranks. Every rank
    ends with rank 0's probe (its BatchNorm statistics included)."""
    net = data_parallel(probe, env)
    optimizer = torch.optim.SGD(probe.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    losses = []
    for epoch in range(cfg.epochs):
        probe.train()
        total, seen = 0.0, 0
        for activations, labels in batches(epoch):
            if len(labels) < 2:  # BatchNorm cannot normalise a lone sample (a last batch of 1)
                continue
            loss = F.cross_entropy(net(activations), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
            seen += len(labels)
        schedule.step()
        total, seen = comm.all_reduce_sum(np.array([total, seen], dtype=np.float64))
        losses.append(float(total / max(seen, 1)))
        log.info("linear probe epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, losses[-1])
    align_replicas(probe, comm)
    return losses


@torch.no_grad()
def probe_scores(probe: LinearProbe, batches: Batches) -> tuple[np.ndarray, np.ndarray]:
    """(class scores (N, C), labels (N,)) of every batch, in eval mode."""
    probe.eval()
    scores, labels = [], []
    for activations, batch_labels in batches:
        scores.append(probe(activations).float().cpu().numpy())
        labels.append(batch_labels.cpu().numpy())
    return np.concatenate(scores), np.concatenate(labels)
