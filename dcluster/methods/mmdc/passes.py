"""The losses of MMDC's two training passes (paper Algorithm 1): the clustering pass, with the
Hungarian re-assignment in every mini-batch, then the rotation pass.

Both passes are plans the harness runs through the same loaders and step loop as
DeepCluster's (DDP, the stop poll, mid-epoch pauses). The clustering pass reads every batch
twice, in lockstep (a ``paired`` plan): centre crops to decide the re-assignment, and
augmented crops for the gradient step (section III.C: fitting augmented views to a target
chosen from the plain image).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcluster.data import TrainBatch
from dcluster.methods.mmdc.assignment import best_permutation
from dcluster.methods.mmdc.model import MMDCNet
from dcluster.methods.mmdc.rotation import rotated_batch
from dcluster.methods.mmdc.targets import TargetBank, Targets
from dcluster.parallel.execution import Execution
from dcluster.runtime.passes import PairedBatch
from dcluster.runtime.stages import BatchLoss

MOVED = "moved"  # the clustering pass's tally: images whose target changed in the Hungarian steps


@dataclass
class PassContext:
    """What both losses of an epoch share."""
    net: nn.Module  # what the steps call: the model, or its DDP replica
    model: MMDCNet
    execution: Execution
    device: torch.device


def clustering_loss(ctx: PassContext, bank: TargetBank, targets: Targets,
                    pair: PairedBatch) -> BatchLoss:
    """Re-assign the batch's targets among its images (``targets.assignment`` is updated in
    place), then the L2 loss towards them. In the refinement stage (``targets.refined``) each
    image's target is instead the mean of its refined component."""
    model, idx = ctx.model, pair.indices.numpy()
    moved = 0
    if targets.refined is None:
        ids = targets.assignment[idx]
        points = bank.points(ids)
        model.eval()
        with torch.no_grad():
            embedded = model.embed(ctx.execution.images(pair.plain.images)).float().cpu().numpy()
        model.train()
        perm = best_permutation(embedded, points)
        targets.assignment[idx] = ids[perm]
        moved = int((perm != np.arange(len(perm))).sum())
        goal = points[perm]
    else:
        goal = bank.means[targets.refined[idx]]
    out = ctx.net(ctx.execution.images(pair.augmented.images), task="embed")
    return BatchLoss(F.mse_loss(out, torch.from_numpy(goal).to(ctx.device)), len(idx),
                     {MOVED: moved})


def rotation_loss(ctx: PassContext, batch: TrainBatch) -> BatchLoss:
    """Each augmented batch in its 4 rotations, cross-entropy on the rotation head (an
    effective batch of 4 x batch_size)."""
    images, labels = rotated_batch(ctx.execution.images(batch.images))
    return BatchLoss(F.cross_entropy(ctx.net(images, task="rotation"), labels),
                     len(batch.indices))
