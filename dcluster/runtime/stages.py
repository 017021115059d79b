"""What a method's epoch is made of, as the harness runs it: an ordered list of stages.

    DeepCluster:    Step(features) -> Step(clustering) -> Pass(train)
    MMDC:           Step(refine) -> Pass(clustering) -> Pass(rotation) -> Step(clusters)

A :class:`Step` is run to its end (a feature pass, a k-means). A :class:`Pass` is a training
pass, and a pass is data (:class:`PassPlan`): this rank's order of images, the loss of a
batch, the optimisers, and what to do beside the steps. The harness (harness.EpochRunner)
runs the stages in order, skips those an interrupted epoch had finished, slices the pass's
order from the position every rank had saved, drives the step loop (optimize.StepLoop) and
places the stop points and checkpoints: no method sees a position or holds resume code.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn



@dataclass
class BatchLoss:
    """The loss of one batch: its value (what is back-propagated), the images it was computed
    on, and a method's counts for the pass (MMDC: the images whose target moved), added up into
    the pass's progress (EpochProgress.tallies, checkpointed with it)."""
    value: torch.Tensor
    images: int
    counts: dict[str, int] = field(default_factory=dict)


# a batch's loss, computed by the method's own code
LossOf = Callable[[Any], BatchLoss]


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
class PassPlan:
    """One training pass of this rank, as data.

    ``order``: the global indices this rank trains on, in order (its slice of the epoch's
    order); the batches are the loader's augmented views of them (``paired``: each batch is a
    :class:`~dcluster.runtime.passes.PairedBatch` of the centre crops and the augmented views
    of the same images, in lockstep). ``loss_of(batch)`` computes the batch's loss through
    ``net`` (the model, or its DDP replica) under autocast; ``optimizers`` step on it.
    ``on_batch(batch, iteration)`` is told of each batch after its forward (the feature bank
    records what the forward computed); ``during`` is entered around the pass's run (again
    after a resume) and exited at its end (the bank's forward hook). ``finish(totals)`` wraps
    the pass up on every rank once it is done: ``totals`` holds ``images`` and each name in
    ``tallies`` (the counts the losses returned), summed over the pass and all ranks."""
    order: np.ndarray
    loss_of: LossOf
    optimizers: Sequence[torch.optim.Optimizer]
    net: nn.Module
    paired: bool = False
    on_batch: Optional[Callable[[Any, int], None]] = None
    during: Optional[AbstractContextManager[Any]] = None
    tallies: tuple[str, ...] = ()
    finish: Optional[Callable[[dict[str, int]], None]] = None


@dataclass
class Pass:
    """A training pass: ``plan()`` is called when the pass starts (after the steps before it
    have run, or were restored), and again when a run resumes inside it. The harness times it
    into ``time_training`` and reports its mean loss over all ranks' images as the metric
    named ``loss``."""
    name: str
    plan: Callable[[], PassPlan]
    loss: str = "loss"
    skip: bool = False


Stage = Union[Step, Pass]
