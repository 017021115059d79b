"""Stopping a run cleanly when Slurm says its time is up, or that it is preempted.

A signal can land anywhere: inside a gradient all-reduce, a FAISS call, a checkpoint write.
So the handler only records it, and the loop acts where every rank can agree on it: between
the stages of an epoch (one all-reduce of the ranks' flags) and between training iterations
(the same flags ride on one small all-reduce every ``checkpoint.poll_every`` iterations, so
every rank stops after the same iteration and no collective is cut in half). There the loop
checkpoints exactly where the epoch stands and raises :class:`TrainingStopped`; whoever
started the loop decides what follows: submitit's requeue (launch/job.py) or an exit code
(``dcluster train``).

The same iteration poll carries the decision to write a periodic mid-epoch checkpoint, and
whether some rank's training loss stopped being finite. Reading its result is the only point
where a training step waits for the device, hence a poll every N iterations on a GPU rather
than every one: the host queues N steps' work without waiting, and a stop still comes within
N iterations.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from dcluster.parallel.collectives import Comm
from dcluster.core.config import CheckpointConfig, ConfigError
from dcluster.core.errors import CleanStop
from dcluster.core.startup_signals import PREEMPT_SIGNAL_ENV, hand_over, preempt_signal_name

log = logging.getLogger(__name__)

def preempt_signal() -> signal.Signals:
    """The signal submitit treats as "timeout or preemption" (startup_signals.py reads it)."""
    name = preempt_signal_name()
    try:
        return signal.Signals[name]
    except KeyError:
        raise ConfigError(f"environment variable {PREEMPT_SIGNAL_ENV}={name!r}: not a signal "
                          "name (e.g. USR2)") from None


class TrainingStopped(CleanStop):
    """The run stopped on a signal after committing ``checkpoint``; running the same command
    (or requeuing the same job) resumes from it. ``epoch`` counts from 0, the message from 1."""

    def __init__(self, signum: int, checkpoint: Optional[Path], epoch: int, iteration: int) -> None:
        self.signum = signum
        written = checkpoint or "the checkpoint rank 0 wrote"  # only rank 0 writes
        super().__init__(f"stopped on {signal.Signals(signum).name} in epoch {epoch + 1} after "
                         f"{iteration} iteration(s); resume from {written}")

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process ended by the signal: a batch script can tell a
        stop it asked for (128 + USR2 = 140) from a failure."""
        return 128 + self.signum


class StopRequest:
    """Records the preemption signal and SIGTERM while a run is in progress.

    A context manager: it installs its handlers on entry and puts back the ones it replaced
    on exit, so that under submitit the job's own handlers (which requeue on rank 0) are in
    place again when the job hands the stop over to them. Outside the main thread Python
    allows no handlers; there it records nothing and says so."""

    def __init__(self) -> None:
        self.signals = (preempt_signal(), signal.SIGTERM)
        self.signum = 0  # the signal received, 0 for none; SIGTERM wins over the other
        self._replaced: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: stop signals are not handled")
            return self
        received = hand_over()  # a signal that came while `dcluster train` started up
        for sig in self.signals:
            self._replaced[sig] = signal.signal(sig, self._record)
        if received:
            self._record(received, None)
        return self

    def __exit__(self, kind: Optional[type], value: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        for sig, handler in self._replaced.items():
            signal.signal(sig, handler)
        self._replaced.clear()

    def _record(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum != signal.SIGTERM:
            self.signum = signum
        log.warning("received %s: checkpointing and stopping at the next iteration boundary",
                    signal.Signals(signum).name)


class StopPoints:
    """Where the loop asks whether to stop or save, and the agreement of all ranks on it.

    The flags travel as [signal number, save due], reduced with max: a signal seen by any rank
    stops all of them, and SIGTERM (15) outranks USR2 (12) because it means the job is ending
    rather than being requeued."""

    def __init__(self, request: StopRequest, cfg: CheckpointConfig, comm: Comm,
                 device: Optional[torch.device] = None) -> None:
        self.request = request
        self.comm = comm
        self.every_iterations = cfg.every_iterations
        self.poll_every = cfg.poll_every or auto_poll_every(device or comm.device)
        self.every_seconds = cfg.every_minutes * 60.0
        self._last_save = time.monotonic()

    def agree(self, flags: list[int]) -> tuple[int, ...]:
        """Every rank's flags ([signal, save due, ...]) reduced, all ranks present (no join in
        progress)."""
        return tuple(int(v) for v in self.comm.all_reduce_max(np.array(flags, dtype=np.int64)))

    def requested(self) -> bool:
        """Whether this rank has received a stop signal (a pass may cut itself short)."""
        return bool(self.request.signum)

    def agreed_stop(self) -> int:
        """At a stage boundary: the signal some rank received, or 0 to go on."""
        return self.agree([self.request.signum, 0])[0]

    def local_flags(self, iterations: int) -> list[int]:
        """This rank's [signal, save due] after ``iterations`` iterations of the epoch.
        The iteration rule is the same on every rank; the clock is rank 0's alone."""
        due = self.every_iterations > 0 and iterations % self.every_iterations == 0
        if self.comm.is_main and self.every_seconds > 0:
            due = due or time.monotonic() - self._last_save >= self.every_seconds
        return [self.request.signum, int(due)]

    def pending_flags(self) -> list[int]:
        """At the end of a pass, what is due though no poll came since: a signal, or rank 0's
        clock (the iteration rule is due only at the iterations the poll looks at)."""
        due = self.comm.is_main and self.every_seconds > 0 and \
            time.monotonic() - self._last_save >= self.every_seconds
        return [self.request.signum, int(due)]

    def poll_due(self, iterations: int) -> bool:
        """Whether the ranks agree after iteration ``iterations``: every ``poll_every``, and
        at every periodic checkpoint of the iteration rule (the same on every rank)."""
        return iterations % self.poll_every == 0 or (
            self.every_iterations > 0 and iterations % self.every_iterations == 0)

    def saved(self) -> None:
        self._last_save = time.monotonic()

    def iteration_poll(self, iterations: int) -> IterationPoll:
        """The poll of a pass that has done ``iterations`` iterations so far."""
        return IterationPoll(self, iterations)


def auto_poll_every(device: torch.device) -> int:
    """checkpoint.poll_every=0: every iteration where the step is computed on the CPU (it is
    synchronous anyway; the poll is one small all-reduce), every 20 on a GPU, where each poll
    drains the device's queue: a few tenths of a millisecond against 20 steps of tens."""
    return 20 if device.type == "cuda" else 1


class IterationPoll(Joinable):
    """The all-reduce of the flags after the iterations the rule picks, as a participant of
    DDP's join context. The flags are [signal, save due, loss not finite], reduced with max.

    With uneven inputs (a rank whose batches ran out early because a whole batch was
    unreadable) DDP's join has the finished rank shadow the others' collectives; as a Joinable
    this poll is shadowed too, by an all-reduce of zeros after the same iterations (the shadow
    counts the iterations it shadows), so it cannot hang them."""

    def __init__(self, stops: StopPoints, iterations: int) -> None:
        super().__init__()
        self.stops = stops
        self.comm = stops.comm
        self.iterations = iterations  # of the pass, shadowed ones included
        self.device = self.comm.device  # where the backend's tensors live (a GPU for NCCL)

    def poll(self, not_finite: Callable[[], torch.Tensor]) -> Optional[list[int]]:
        """After an iteration: None if no agreement is due, else the agreed flags.
        ``not_finite()``: a 0-d tensor on the training device, 1 if this rank's loss sum is
        not finite; it joins the flags on the device, so the one read is the agreed result."""
        self.iterations += 1
        if not self.stops.poll_due(self.iterations):
            return None
        local = self.stops.local_flags(self.iterations)
        flags = torch.cat([torch.tensor(local, dtype=torch.int64, device=self.device),
                           not_finite().reshape(1).to(self.device, torch.int64)])
        if self.comm.world_size > 1:
            Join.notify_join_context(self)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.tolist()

    def join_hook(self, **kwargs: Any) -> JoinHook:
        return _ShadowPoll(self)

    @property
    def join_device(self) -> torch.device:
        return self.device

    @property
    def join_process_group(self) -> Any:
        return dist.group.WORLD


class _ShadowPoll(JoinHook):
    def __init__(self, poll: IterationPoll) -> None:
        self.poll = poll

    def main_hook(self) -> None:
        self.poll.iterations += 1
        if self.poll.stops.poll_due(self.poll.iterations):
            dist.all_reduce(torch.zeros(3, dtype=torch.int64, device=self.poll.device),
                            op=dist.ReduceOp.MAX)
