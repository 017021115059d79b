"""Optimisers, data-parallel replicas, and the step loop every training pass runs."""
from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from dcluster.collectives import Comm
from dcluster.config import OptimConfig
from dcluster.data import Pipelines, num_batches
from dcluster.distributed import Env
from dcluster.logs import progress
from dcluster.models import DeepClusterNet
from dcluster.stop import StopPoints


def sgd(params, cfg: OptimConfig, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def body_optimizer(model: DeepClusterNet, cfg: OptimConfig, lr: float) -> torch.optim.SGD:
    """Everything trainable except the head: its momentum carries over from epoch to epoch."""
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and not name.startswith("head.")]
    return sgd(params, cfg, lr)


def data_parallel(model: nn.Module, env: Env, find_unused_parameters: bool = False) -> nn.Module:
    """What the training steps call: the model itself in a single process, else a DDP replica
    that averages gradients over the ranks.

    Call again after every head reset. The head is a new module, and DDP registers the
    parameters it synchronises when it is constructed, so the old wrapper would leave the new
    head out of the gradient all-reduce. Re-wrapping (rather than wrapping once with a
    resizable head) also makes DDP broadcast rank 0's parameters and buffers again, so every
    rank starts the epoch from the same state even if they drifted (they should not: the head
    is drawn from the same (seed, epoch) generator everywhere). It costs one broadcast of the
    model per clustering, small next to an epoch.

    forward_sync_buffers copies one rank's BatchNorm running statistics to every rank at each
    forward (DDP's default, spelled out; rank 0's, or inside DDP's join the highest rank still
    training); :func:`align_replicas` makes them rank 0's after the last step.
    ``find_unused_parameters``: for a network whose passes use different heads (MMDC)."""
    if env.world_size == 1:
        return model
    return DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
        forward_sync_buffers=True, find_unused_parameters=find_unused_parameters)


@dataclass
class EpochProgress:
    """Where one rank stands in a training pass. Saved for every rank in a mid-epoch
    checkpoint, it is what a resumed pass continues from."""
    position: int = 0  # next position in this rank's slice of the pass's order
    iterations: int = 0  # optimiser steps taken (poll rounds, equal on every rank still training)
    loss_sum: float = 0.0  # loss summed over the images trained on
    images: int = 0
    tallies: dict[str, int] = field(default_factory=dict)  # a method's own counts (MMDC: moved)


@dataclass
class Pause:
    """A training pass returned before its order was done, by agreement of every rank, for
    the caller to checkpoint and then stop (``signum``) or go on (a periodic checkpoint)."""
    signum: int  # the stop signal, 0 for a periodic checkpoint


class Batch(Protocol):
    next_position: int  # where a pass resumed after this batch starts


# the loss of one batch and the number of images it was computed on
LossOf = Callable[[Any], tuple[torch.Tensor, int]]


@dataclass
class StepLoop:
    """The optimisation loop every training pass of every method runs: forward through
    ``loss_of``, backward, step, a finite-loss check, and after each iteration the poll on
    which all ranks agree to go on, checkpoint or stop."""
    device: torch.device
    progress_mode: str
    show: bool  # rank 0 draws the progress bar
    stops: StopPoints

    def run(self, net: nn.Module, batches: Iterable[Batch], total: int, desc: str,
            loss_of: LossOf, optimizers: Sequence[torch.optim.Optimizer], epoch: int,
            done: EpochProgress) -> Optional[Pause]:
        """Train on ``batches`` (those of a pass from ``done.position`` on), updating ``done``.

        Returns None once every rank's batches are done, or the pause the ranks agreed on
        after the same iteration (a stop signal, a periodic checkpoint); the caller
        checkpoints ``done`` and calls again with the batches from ``done.position`` on. A
        stop already requested before the first batch (during the clustering, say) pauses
        at once.

        Every rank has the same number of batches, but a batch whose images are all
        unreadable is skipped, so a rank can run out early: DDP's join, with the flag poll as
        a second joinable, lets it keep answering the others' collectives instead of
        hanging them."""
        signum = self.stops.agreed_stop()
        if signum:
            return Pause(signum)
        net.train()
        poll = self.stops.iteration_poll()
        flags = [0, 0]
        ddp = isinstance(net, DistributedDataParallel)
        own_buffers: list[torch.Tensor] = []
        with Join([net, poll], divide_by_initial_world_size=True) if ddp else nullcontext():
            for batch in progress(batches, total, desc, self.progress_mode, self.show):
                loss, images = loss_of(batch)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in optimizers:
                    opt.step()
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"epoch {epoch + 1}: training loss became {value}; "
                                             f"lower optim.lr ({optimizers[0].defaults['lr']})")
                done.position = batch.next_position
                done.iterations += 1
                done.loss_sum += value * images
                done.images += images
                flags = poll.poll(self.stops.local_flags(done.iterations))
                if any(flags):
                    break
            if ddp:
                own_buffers = [buffer.detach().clone() for buffer in net.buffers()]
        # out of the join on every rank: those that ran out early learn the decision too
        signum, save_due = self.stops.agree(flags)
        if not (signum or save_due):
            return None
        # Leaving DDP's join broadcasts the last joiner's model to every rank, which a pass
        # that is not paused does only at its end: a rank keeps its own BatchNorm buffers
        # (which it updates between DDP's synchronisations), so a paused pass goes on, and a
        # resumed one restarts, exactly as the uninterrupted pass would
        with torch.no_grad():
            for buffer, own in zip(net.buffers(), own_buffers):
                buffer.copy_(own)
        return Pause(signum)


def train_one_epoch(net: nn.Module, pipelines: Pipelines, order: Sequence[int], labels: np.ndarray,
                    epoch: int, batch_size: int, optimizers: Sequence[torch.optim.Optimizer],
                    steps: StepLoop, done: EpochProgress) -> Optional[Pause]:
    """DeepCluster's training pass: cross-entropy of ``net`` on the pseudo-labels ``labels``
    over this rank's ``order``, from ``done.position`` on (see :meth:`StepLoop.run`)."""
    criterion = nn.CrossEntropyLoss()

    def loss_of(batch) -> tuple[torch.Tensor, int]:
        images = batch.images.to(steps.device, non_blocking=True)
        targets = batch.targets.to(steps.device, non_blocking=True)
        return criterion(net(images), targets), images.shape[0]

    batches = pipelines.train_batches(order, labels, epoch, batch_size, done.position)
    return steps.run(net, batches, num_batches(len(order), batch_size, done.position), "train",
                     loss_of, optimizers, epoch, done)


def pass_loss(done: EpochProgress, comm: Comm) -> float:
    """Mean loss over the pass's images of all ranks."""
    total, seen = comm.all_reduce_sum(np.array([done.loss_sum, done.images], dtype=np.float64))
    return float(total / max(seen, 1.0))


def align_replicas(model: nn.Module, comm: Comm) -> None:
    """Make every rank's model equal to rank 0's, the one that is checkpointed, so a resumed
    run starts where every rank was and matches the uninterrupted run.

    BatchNorm running statistics are updated locally by the last forward of the epoch (DDP only
    broadcasts them at the start of each forward): they are copied from rank 0. Parameters are
    already equal when DDP works, since every rank applies the same averaged gradients; they
    are compared by digest, and a difference is an error rather than something to paper over."""
    if comm.world_size == 1:
        return
    for buffer in model.buffers():
        host = buffer.detach().cpu().contiguous()
        buffer.copy_(torch.from_numpy(comm.broadcast(host.numpy())))
    digests = [(name, hashlib.blake2b(p.detach().cpu().contiguous().numpy().tobytes(),
                                      digest_size=16).hexdigest())
               for name, p in model.named_parameters()]
    differing = {name for rank_digests in comm.all_gather_object(digests)
                 for (name, digest), (_, mine) in zip(rank_digests, digests) if digest != mine}
    if differing:
        raise RuntimeError(f"model replicas differ between ranks in {sorted(differing)}: "
                           "a parameter is not covered by DDP's gradient synchronisation")
