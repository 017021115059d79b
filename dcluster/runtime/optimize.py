"""Optimisers, data-parallel replicas, and the step loop every training pass runs."""
from __future__ import annotations

import hashlib
import inspect
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence, TypeVar

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from dcluster.parallel.collectives import Comm
from dcluster.core.config import DistributedConfig, OptimConfig
from dcluster.data import Pipelines, num_batches
from dcluster.parallel.distributed import Env
from dcluster.parallel.execution import Execution, fused_optimizer_kwargs
from dcluster.core.logs import progress
from dcluster.models import DeepClusterNet
from dcluster.runtime.stop import StopPoints


T = TypeVar("T")


def sgd(params, cfg: OptimConfig, lr: float,
        device: torch.device = torch.device("cpu")) -> torch.optim.SGD:
    """SGD with momentum; fused into one kernel on a GPU (execution.fused_optimizer_kwargs)."""
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           **fused_optimizer_kwargs(device))


def body_optimizer(model: DeepClusterNet, cfg: OptimConfig, lr: float,
                   device: torch.device = torch.device("cpu")) -> torch.optim.SGD:
    """Everything trainable except the head: its momentum carries over from epoch to epoch."""
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and not name.startswith("head.")]
    return sgd(params, cfg, lr, device)


def data_parallel(model: nn.Module, env: Env, find_unused_parameters: bool = False,
                  cfg: DistributedConfig = DistributedConfig()) -> nn.Module:
    """What the training steps call: the model itself in a single process, else a DDP replica
    that averages gradients over the ranks.

    Call again after every head reset. The head is a new module, and DDP registers the
    parameters it synchronises when it is constructed, so the old wrapper would leave the new
    head out of the gradient all-reduce. Re-wrapping (rather than wrapping once with a
    resizable head) also makes DDP broadcast rank 0's parameters and buffers again, so every
    rank starts the epoch from the same state even if they drifted (they should not: the head
    is drawn from the same (seed, epoch) generator everywhere). It costs one broadcast of the
    model per clustering, small next to an epoch.

    Buffer sync copies one rank's BatchNorm running statistics to every rank at each
    forward (DDP's default, spelled out; rank 0's, or inside DDP's join the highest rank still
    training); :func:`align_replicas` makes them rank 0's after the last step. Its keyword
    depends on the torch: :func:`buffer_sync_kwargs`.
    ``find_unused_parameters``: for a network whose passes use different heads (MMDC).

    gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets, which
    saves a copy of every gradient and its memory; ``cfg.grad_compression=bf16`` all-reduces
    the buckets in bfloat16 (half the bytes between nodes, gradients rounded to 8 bits of
    mantissa before they are averaged)."""
    if env.world_size == 1:
        return model
    net = DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True,
        **buffer_sync_kwargs(DistributedDataParallel.__init__))
    if cfg.grad_compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        net.register_comm_hook(None, bf16_compress_hook)
    return net


def buffer_sync_kwargs(ddp_init: Callable[..., Any]) -> dict[str, bool]:
    """DDP's keyword for syncing buffers at every forward, read from ``ddp_init``'s
    signature: torch 2.13 added ``forward_sync_buffers`` and deprecated ``broadcast_buffers``
    (torch/nn/parallel/distributed.py of 2.13); 2.11 and 2.12 have only the old name, and
    the new one there is a TypeError at the first ``data_parallel`` call, after a whole
    feature pass and k-means (issue #31)."""
    if "forward_sync_buffers" in inspect.signature(ddp_init).parameters:
        return {"forward_sync_buffers": True}
    return {"broadcast_buffers": True}


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
    ``loss_of`` under autocast, backward (loss-scaled for fp16), step, and every few
    iterations the poll on which all ranks agree to go on, checkpoint or stop, which also
    carries the finite-loss check.

    Nothing in a step waits for the device: the loss is summed on the device and read at the
    end of the pass (or at a pause), and the poll's result is read only every
    ``stops.poll_every`` iterations. ``data_wait_s`` adds up the time spent waiting for the
    loader's batches (the epoch's telemetry)."""
    device: torch.device
    progress_mode: str
    show: bool  # rank 0 draws the progress bar
    stops: StopPoints
    execution: Optional[Execution] = None  # None: float32, contiguous, on ``device``
    data_wait_s: float = 0.0

    def __post_init__(self) -> None:
        self.execution = self.execution or Execution(self.device)
        # fp16's loss scale; its state is checkpointed with the run (harness: "grad_scaler")
        self.scaler = self.execution.grad_scaler()

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
        poll = self.stops.iteration_poll(done.iterations)
        # float64 from the saved sum on: a resumed pass adds up exactly as an uninterrupted one
        loss_sum = torch.tensor(done.loss_sum, dtype=torch.float64, device=self.device)

        def not_finite() -> torch.Tensor:
            return ~torch.isfinite(loss_sum)

        agreed: Optional[list[int]] = None  # the last poll's flags, once one asked to pause
        ddp = isinstance(net, DistributedDataParallel)
        own_buffers: list[torch.Tensor] = []
        autocast, scaler = self.execution.autocast, self.scaler
        with Join([net, poll], divide_by_initial_world_size=True) if ddp else nullcontext():
            for batch in self._waited(progress(batches, total, desc, self.progress_mode,
                                               self.show)):
                with autocast():
                    loss, images = loss_of(batch)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                for opt in optimizers:
                    scaler.step(opt)
                scaler.update()
                loss_sum += loss.detach().double() * images
                done.position = batch.next_position
                done.iterations += 1
                done.images += images
                flags = poll.poll(not_finite)
                if flags is not None and any(flags):
                    agreed = flags
                    break
            if ddp:
                own_buffers = [buffer.detach().clone() for buffer in net.buffers()]
        done.loss_sum = loss_sum.item()
        # out of the join on every rank: those that ran out early learn the decision too, and
        # what came up since a rank's last poll counts as well
        signum, save_due, bad_loss = self.stops.agree(
            agreed or [*self.stops.pending_flags(), int(not_finite().item())])
        if bad_loss:
            raise FloatingPointError(
                f"epoch {epoch + 1}: the training loss stopped being finite by iteration "
                f"{done.iterations} (summed on this rank: {done.loss_sum}); lower optim.lr "
                f"({optimizers[0].defaults['lr']})")
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

    def _waited(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, adding the time spent waiting for each to ``data_wait_s``."""
        source = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(source)
            except StopIteration:
                return
            finally:
                self.data_wait_s += time.perf_counter() - start
            yield item


# called after each training forward with its batch and the pass's iteration (the bank)
AfterForward = Callable[[Any, int], None]


def train_one_epoch(net: nn.Module, pipelines: Pipelines, order: Sequence[int], labels: np.ndarray,
                    epoch: int, batch_size: int, optimizers: Sequence[torch.optim.Optimizer],
                    steps: StepLoop, done: EpochProgress,
                    after_forward: Optional[AfterForward] = None) -> Optional[Pause]:
    """DeepCluster's training pass: cross-entropy of ``net`` on the pseudo-labels ``labels``
    over this rank's ``order``, from ``done.position`` on (see :meth:`StepLoop.run`).
    ``after_forward(batch, iteration)``: told of each forward (the feature bank reads the
    features it computed)."""
    criterion = nn.CrossEntropyLoss()

    def loss_of(batch) -> tuple[torch.Tensor, int]:
        images = steps.execution.images(batch.images)
        targets = torch.from_numpy(labels[batch.indices.numpy()]).to(steps.device,
                                                                     non_blocking=True)
        loss = criterion(net(images), targets)
        if after_forward is not None:
            after_forward(batch, done.iterations)
        return loss, images.shape[0]

    batches = pipelines.train_batches(order, epoch, batch_size, done.position)
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
