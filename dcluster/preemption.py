"""Cooperative stop on a timeout or preemption signal.

Slurm (through submitit) sends USR2 shortly before a job's time limit or on preemption.
submitit's own handler would checkpoint and requeue *inside the signal handler*, i.e. in the
middle of whatever the training loop was doing — possibly halfway through a collective on one
rank and not on the others. Here the handler only records the request; the loop polls
:func:`stop_requested` at iteration boundaries, agrees with the other ranks (all-reduce of the
flag), writes a consistent checkpoint, and then calls :func:`hand_over` — which passes the
signal on to submitit's handler, so that global rank 0 requeues the job exactly as submitit
documents (max_num_timeout counting included).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType
from typing import Any, Callable, Optional, Union

log = logging.getLogger("dcluster.preemption")

_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


class _State:
    requested: Optional[int] = None  # the signal number received, if any
    signum: Optional[int] = None  # the signal our handler is installed for
    passed_on: _Handler = None  # the handler ours replaced (submitit's, in a submitit job)


def preemption_signal() -> int:
    """The signal submitit asks Slurm for (USR2 unless SUBMITIT_PREEMPT_SIGNAL says else)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def _record(signum: int, frame: Optional[FrameType]) -> None:
    _State.requested = signum


def install_preemption_handler(signum: Optional[int] = None) -> None:
    """Record the signal instead of acting on it; call after submitit installed its handler."""
    _State.signum = preemption_signal() if signum is None else signum
    _State.passed_on = signal.getsignal(_State.signum)
    _State.requested = None
    signal.signal(_State.signum, _record)
    log.info("stop-at-next-iteration handler installed for %s", signal.Signals(_State.signum).name)


def stop_requested() -> bool:
    """Whether this process received the signal (the loop all-reduces it across ranks)."""
    return _State.requested is not None


class Preempted(Exception):
    """The run stopped on a signal after writing its checkpoint (no submitit to requeue it)."""


def hand_over() -> None:
    """After the checkpoint: let submitit's handler requeue (rank 0) and end this process; where
    there is no submitit handler, raise Preempted so the caller exits with a clear message."""
    handler, signum = _State.passed_on, _State.signum or preemption_signal()
    if callable(handler):
        log.warning("checkpoint written; handing %s to submitit to requeue the job",
                    signal.Signals(signum).name)
        handler(signum, None)  # rank 0 requeues and exits; other ranks return here
        sys.exit(0)
    raise Preempted(f"stopped on {signal.Signals(signum).name} after writing a checkpoint; "
                    "run the same command again to resume")
