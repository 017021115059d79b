"""What a method's epoch is made of, as the harness runs it: an ordered list of stages.

    DeepCluster: Step(features) -> Step(clustering) -> Pass(train)
    MMDC:        Step(refine) -> Pass(clustering) -> Pass(rotation) -> Step(clusters)

A :class:`Step` is run to its end (a feature pass, a k-means); a :class:`Pass` is a training
pass over batches that can pause after any iteration and continue later from its saved
position (optimize.StepLoop). A method only declares them (``stages(epoch)``); the harness
(harness.EpochRunner) runs them in order, skips those an interrupted epoch had finished,
restores the position of the pass it was in, and places the stop points and checkpoints, so
that no method holds resume code.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from dcluster.runtime.optimize import EpochProgress, Pause

# trains from ``done.position`` on, updating ``done``; returns None at the pass's end, or the
# pause all ranks agreed on (StepLoop.run)
Train = Callable[[], Optional[Pause]]


@dataclass
class Epoch:
    """One epoch as its stages see it: its number (from 0) and what it has measured so far
    (restored with the epoch when it resumes)."""
    number: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Step:
    """A stage run to its end. ``timer``: the metric its wall time is added to. ``skip``: not
    run this epoch (DeepCluster re-clusters only every clustering.every epochs)."""
    name: str
    run: Callable[[], None]
    timer: Optional[str] = None
    skip: bool = False


@dataclass
class Pass:
    """A training pass from a saved position. ``open(done)`` is entered once per run of the
    pass (again after a resume), with ``done`` where this rank stands (restored by the
    harness); it yields the function that trains from ``done.position`` on, called again after
    every pause, and what follows its ``yield`` is the pass's wrap-up (its own metrics). The
    harness times it into ``time_training`` and reports its mean loss over all ranks' images
    as the metric named ``loss``."""
    name: str
    open: Callable[[EpochProgress], AbstractContextManager[Train]]
    loss: str = "loss"
    skip: bool = False


Stage = Union[Step, Pass]
