"""The two training passes of an MMDC epoch (paper Algorithm 1): the clustering pass, with the
Hungarian re-assignment in every mini-batch, then the rotation pass.

Both go through the same loaders as DeepCluster, driven by index lists. The clustering pass
reads every batch twice, in lockstep: centre crops (the feature pipeline) to decide the
re-assignment, and augmented crops (the training pipeline) for the gradient step (section
III.C: fitting augmented views to a target chosen from the plain image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from dcluster.data import Pipelines, num_batches
from dcluster.logs import progress
from dcluster.mmdc.assignment import best_permutation
from dcluster.mmdc.model import MMDCNet
from dcluster.mmdc.rotation import rotated_batch
from dcluster.mmdc.targets import TargetBank


@dataclass
class PassStats:
    loss: float  # mean over the pass's images
    images: int
    moved: int = 0  # images whose target changed in the Hungarian steps


@dataclass
class PassContext:
    """What both passes of an epoch share."""
    model: MMDCNet
    pipelines: Pipelines
    optimizer: torch.optim.Optimizer
    epoch: int
    batch_size: int
    device: torch.device
    progress_mode: str
    show: bool


def _step(ctx: PassContext, loss: torch.Tensor) -> float:
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ctx.optimizer.step()
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"epoch {ctx.epoch}: training loss became {value}; lower "
                                 f"optim.lr ({ctx.optimizer.param_groups[0]['lr']})")
    return value


def clustering_pass(ctx: PassContext, order: np.ndarray, bank: TargetBank,
                    assignment: np.ndarray, refined: Optional[np.ndarray]) -> PassStats:
    """One pass over ``order``: per batch, re-assign the batch's targets among its images
    (``assignment`` is updated in place), then an L2 step towards them. With ``refined``
    (refinement stage) each image's target is instead the mean of its refined component."""
    model = ctx.model
    unused_labels = np.zeros(len(bank), dtype=np.int64)  # the loader carries labels; none here
    centre = ctx.pipelines.feature_batches(order, ctx.batch_size)
    augmented = ctx.pipelines.train_batches(order, unused_labels, ctx.epoch, ctx.batch_size)
    total, seen, moved = 0.0, 0, 0
    for plain, batch in progress(zip(centre, augmented), num_batches(len(order), ctx.batch_size),
                                 "mmdc", ctx.progress_mode, ctx.show):
        if not torch.equal(plain.indices, batch.indices):
            raise RuntimeError(f"epoch {ctx.epoch}: the centre-crop and augmented passes "
                               "disagree on a batch's images (an image readable in one only?)")
        idx = batch.indices.numpy()
        if refined is None:
            ids = assignment[idx]
            points = bank.points(ids)
            model.eval()
            with torch.no_grad():
                embedded = model.embed(plain.images.to(ctx.device)).float().cpu().numpy()
            perm = best_permutation(embedded, points)
            assignment[idx] = ids[perm]
            moved += int((perm != np.arange(len(perm))).sum())
            targets = points[perm]
        else:
            targets = bank.means[refined[idx]]
        model.train()
        out = model.embed(batch.images.to(ctx.device, non_blocking=True))
        loss = F.mse_loss(out, torch.from_numpy(targets).to(ctx.device))
        total += _step(ctx, loss) * len(idx)
        seen += len(idx)
    return PassStats(loss=total / max(seen, 1), images=seen, moved=moved)


def rotation_pass(ctx: PassContext, order: np.ndarray, n_images: int) -> PassStats:
    """One pass over ``order``: each augmented batch in its 4 rotations, cross-entropy on the
    rotation head (an effective batch of 4 x batch_size)."""
    model = ctx.model
    model.train()
    unused_labels = np.zeros(n_images, dtype=np.int64)
    total, seen = 0.0, 0
    batches = ctx.pipelines.train_batches(order, unused_labels, ctx.epoch, ctx.batch_size)
    for batch in progress(batches, num_batches(len(order), ctx.batch_size), "rotation",
                          ctx.progress_mode, ctx.show):
        images, labels = rotated_batch(batch.images.to(ctx.device, non_blocking=True))
        loss = F.cross_entropy(model.rotation_logits(images), labels)
        total += _step(ctx, loss) * len(batch.indices)
        seen += len(batch.indices)
    return PassStats(loss=total / max(seen, 1), images=seen)
