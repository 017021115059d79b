"""The two training passes of an MMDC epoch (paper Algorithm 1): the clustering pass, with the
Hungarian re-assignment in every mini-batch, then the rotation pass.

Both go through the same loaders as DeepCluster, driven by index lists, and through the same
step loop (optimize.StepLoop: DDP, the stop poll, mid-epoch pauses). The clustering pass reads
every batch twice, in lockstep: centre crops (the feature pipeline) to decide the
re-assignment, and augmented crops (the training pipeline) for the gradient step (section
III.C: fitting augmented views to a target chosen from the plain image).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcluster.data import FeatureBatch, Pipelines, TrainBatch, num_batches
from dcluster.methods.mmdc.assignment import best_permutation
from dcluster.methods.mmdc.model import MMDCNet
from dcluster.methods.mmdc.rotation import rotated_batch
from dcluster.methods.mmdc.targets import TargetBank, Targets
from dcluster.runtime.optimize import EpochProgress, Pause, StepLoop

MOVED = "moved"  # EpochProgress tally: images whose target changed in the Hungarian steps


@dataclass
class PassContext:
    """What both passes of an epoch share."""
    net: nn.Module  # what the steps call: the model, or its DDP replica
    model: MMDCNet
    pipelines: Pipelines
    optimizer: torch.optim.Optimizer
    steps: StepLoop
    epoch: int
    batch_size: int


@dataclass
class PairedBatch:
    plain: FeatureBatch  # centre crops: decide the targets
    augmented: TrainBatch  # the same images augmented: the gradient step

    @property
    def next_position(self) -> int:
        return self.augmented.next_position


def lockstep(centre: Iterator[FeatureBatch], augmented: Iterator[TrainBatch],
             epoch: int) -> Iterator[PairedBatch]:
    for plain, batch in zip(centre, augmented):
        if not torch.equal(plain.indices, batch.indices):
            raise RuntimeError(f"epoch {epoch + 1}: the centre-crop and augmented passes disagree "
                               "on a batch's images (an image readable in one only?)")
        yield PairedBatch(plain, batch)


def clustering_pass(ctx: PassContext, order: np.ndarray, bank: TargetBank, targets: Targets,
                    done: EpochProgress) -> Optional[Pause]:
    """This rank's ``order`` from ``done.position`` on: per batch, re-assign the batch's
    targets among its images (``targets.assignment`` is updated in place), then an L2 step
    towards them. In the refinement stage (``targets.refined``) each image's target is
    instead the mean of its refined component."""
    model, device, start = ctx.model, ctx.steps.device, done.position
    centre = ctx.pipelines.feature_batches(order[start:], ctx.batch_size)
    augmented = ctx.pipelines.train_batches(order, ctx.epoch, ctx.batch_size, start)

    def loss_of(pair: PairedBatch) -> tuple[torch.Tensor, int]:
        idx = pair.augmented.indices.numpy()
        if targets.refined is None:
            ids = targets.assignment[idx]
            points = bank.points(ids)
            model.eval()
            with torch.no_grad():
                embedded = model.embed(ctx.steps.execution.images(pair.plain.images)
                                       ).float().cpu().numpy()
            model.train()
            perm = best_permutation(embedded, points)
            targets.assignment[idx] = ids[perm]
            done.tallies[MOVED] = done.tallies.get(MOVED, 0) + int((perm != np.arange(len(perm))).sum())
            goal = points[perm]
        else:
            goal = bank.means[targets.refined[idx]]
        out = ctx.net(ctx.steps.execution.images(pair.augmented.images), task="embed")
        return F.mse_loss(out, torch.from_numpy(goal).to(device)), len(idx)

    return ctx.steps.run(ctx.net, lockstep(centre, augmented, ctx.epoch),
                         num_batches(len(order), ctx.batch_size, start), "mmdc", loss_of,
                         [ctx.optimizer], ctx.epoch, done)


def rotation_pass(ctx: PassContext, order: np.ndarray, n_images: int,
                  done: EpochProgress) -> Optional[Pause]:
    """This rank's ``order`` from ``done.position`` on: each augmented batch in its 4
    rotations, cross-entropy on the rotation head (an effective batch of 4 x batch_size)."""
    batches = ctx.pipelines.train_batches(order, ctx.epoch, ctx.batch_size, done.position)

    def loss_of(batch: TrainBatch) -> tuple[torch.Tensor, int]:
        images, labels = rotated_batch(ctx.steps.execution.images(batch.images))
        return F.cross_entropy(ctx.net(images, task="rotation"), labels), len(batch.indices)

    return ctx.steps.run(ctx.net, batches, num_batches(len(order), ctx.batch_size, done.position),
                         "rotation", loss_of, [ctx.optimizer], ctx.epoch, done)
