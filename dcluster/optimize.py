"""Optimisers, data-parallel replicas, and one epoch of supervised training on the pseudo-labels."""
from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

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


def data_parallel(model: DeepClusterNet, env: Env) -> nn.Module:
    """What the training steps call: the model itself in a single process, else a DDP replica
    that averages gradients over the ranks.

    Call again after every head reset. The head is a new module, and DDP registers the
    parameters it synchronises when it is constructed, so the old wrapper would leave the new
    head out of the gradient all-reduce. Re-wrapping (rather than wrapping once with a
    resizable head) also makes DDP broadcast rank 0's parameters and buffers again, so every
    rank starts the epoch from the same state even if they drifted (they should not: the head
    is drawn from the same (seed, epoch) generator everywhere). It costs one broadcast of the
    model per clustering, small next to an epoch.

    forward_sync_buffers copies rank 0's BatchNorm running statistics to every rank at each
    forward (DDP's default, spelled out); :func:`align_replicas` covers the last step's update."""
    if env.world_size == 1:
        return model
    return DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
        forward_sync_buffers=True)


@dataclass
class EpochProgress:
    """Where one rank stands in an epoch's training pass. Saved for every rank in a mid-epoch
    checkpoint, it is what a resumed pass continues from."""
    position: int = 0  # next position in this rank's slice of the epoch's order
    iterations: int = 0  # optimiser steps taken (poll rounds, equal on every rank still training)
    loss_sum: float = 0.0  # cross-entropy summed over the images trained on
    images: int = 0


@dataclass
class Pause:
    """A training pass returned before its order was done, by agreement of every rank, for
    the caller to checkpoint and then stop (``signum``) or go on (a periodic checkpoint)."""
    signum: int  # the stop signal, 0 for a periodic checkpoint


def train_one_epoch(net: nn.Module, pipelines: Pipelines, order: Sequence[int], labels: np.ndarray,
                    epoch: int, batch_size: int, optimizers: Sequence[torch.optim.Optimizer],
                    device: torch.device, progress_mode: str, show: bool, done: EpochProgress,
                    stops: StopPoints) -> Optional[Pause]:
    """Train ``net`` on this rank's ``order`` from ``done.position`` on, updating ``done``.

    Returns None once every rank's order is done, or the pause the ranks agreed on after the
    same iteration (a stop signal, a periodic checkpoint); the caller checkpoints ``done`` and
    calls again to go on. A stop already requested before the first batch (during the
    clustering, say) pauses at once.

    Every rank has the same number of batches, but a batch whose images are all unreadable
    is skipped, so a rank can run out early: DDP's join, with the flag poll as a second
    joinable, lets it keep answering the others' collectives instead of hanging them."""
    signum = stops.agreed_stop()
    if signum:
        return Pause(signum)
    net.train()
    criterion = nn.CrossEntropyLoss()
    poll = stops.iteration_poll()
    flags = [0, 0]
    batches = pipelines.train_batches(order, labels, epoch, batch_size, done.position)
    ddp = isinstance(net, DistributedDataParallel)
    with Join([net, poll], divide_by_initial_world_size=True) if ddp else nullcontext():
        for batch in progress(batches, num_batches(len(order), batch_size, done.position),
                              "train", progress_mode, show):
            images = batch.images.to(device, non_blocking=True)
            targets = batch.targets.to(device, non_blocking=True)
            loss = criterion(net(images), targets)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"epoch {epoch}: training loss became {value}; lower "
                                         f"optim.lr ({optimizers[0].defaults['lr']})")
            done.position = batch.next_position
            done.iterations += 1
            done.loss_sum += value * images.shape[0]
            done.images += images.shape[0]
            flags = poll.poll(stops.local_flags(done.iterations))
            if any(flags):
                break
    # out of the join on every rank: those that ran out early learn the decision too
    signum, save_due = stops.agree(flags)
    return Pause(signum) if signum or save_due else None


def epoch_loss(done: EpochProgress, comm: Comm) -> float:
    """Mean cross-entropy over the epoch's images of all ranks."""
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
