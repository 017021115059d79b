"""Stop signals that arrive while `dcluster train` starts up.

Before a run's :class:`dcluster.runtime.stop.StopRequest` handles SIGTERM and the preemption signal,
`dcluster train` spends seconds importing torch, reading the config and the image list and
joining the process group. A signal in that window used to end the process with Python's
default action: no log line, no checkpoint, and an exit status Slurm and submitit read as a
crash rather than a stop. So the CLI installs these handlers first, before anything slow is
imported (this module needs only the standard library); they record the signal, and the
StopRequest takes it over, so the run stops at its first stop point, like any other stop.
"""
from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any, Optional

# submitit's variable for the signal it treats as "timeout or preemption" (USR2 by default);
# Slurm sends it --signal's delay before the time limit.
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"

_received = 0  # the signal recorded during start-up, 0 for none; SIGTERM wins
_replaced: dict[int, Any] = {}


def preempt_signal_name() -> str:
    """The preemption signal's name as SIGXXX (not checked: stop.preempt_signal says if it is
    no signal, as a config error)."""
    name = os.environ.get(PREEMPT_SIGNAL_ENV, "USR2").upper()
    return name if name.startswith("SIG") else f"SIG{name}"


def install() -> None:
    """Record SIGTERM and the preemption signal from now until :func:`hand_over`."""
    names = {"SIGTERM", preempt_signal_name()}
    for sig in (getattr(signal.Signals, name) for name in names if name in signal.Signals.__members__):
        _replaced[sig] = signal.signal(sig, _record)


def _record(signum: int, frame: Optional[FrameType]) -> None:
    global _received
    if _received != signal.SIGTERM:
        _received = signum


def hand_over() -> int:
    """Put back the handlers :func:`install` replaced and return the signal received since
    (0 for none): the caller now handles the signals, and acts on this one."""
    global _received
    for sig, handler in _replaced.items():
        signal.signal(sig, handler)
    _replaced.clear()
    received, _received = _received, 0
    return received
