"""The batches of a training pass (stages.PassPlan) from a position of its order, and one
run of the pass through the step loop: what the harness does with a method's plan, and what
a test drives without the harness.

A plan's batches are the loader's augmented views of its order (every view ``data.crops``
declares); a ``paired`` plan reads every batch twice in lockstep, centre crops (the feature
pipeline) beside the augmented views (MMDC decides its targets from the plain image and
fits the augmented ones to them). Both loaders key an image's crops by its position in the
order, so a pass resumed at a position gets the batches the uninterrupted pass had.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from dcluster.data import FeatureBatch, Pipelines, TrainBatch, num_batches
from dcluster.runtime.optimize import Batch, EpochProgress, Pause, StepLoop
from dcluster.runtime.stages import PassPlan


@dataclass
class PairedBatch:
    plain: FeatureBatch  # centre crops: what a method decides from
    augmented: TrainBatch  # the same images augmented: the gradient step

    @property
    def indices(self) -> torch.Tensor:
        return self.augmented.indices

    @property
    def next_position(self) -> int:
        return self.augmented.next_position


def lockstep(centre: Iterable[FeatureBatch], augmented: Iterable[TrainBatch],
             epoch: int) -> Iterator[PairedBatch]:
    for plain, batch in zip(centre, augmented):
        if not torch.equal(plain.indices, batch.indices):
            raise RuntimeError(f"epoch {epoch + 1}: the centre-crop and augmented passes disagree "
                               "on a batch's images (an image readable in one only?)")
        yield PairedBatch(plain, batch)


def pass_batches(pipelines: Pipelines, plan: PassPlan, epoch: int, batch_size: int,
                 start: int) -> Iterator[Batch]:
    """The batches of ``plan`` from position ``start`` of its order on."""
    augmented = pipelines.train_batches(plan.order, epoch, batch_size, start)
    if not plan.paired:
        return augmented
    return lockstep(pipelines.feature_batches(plan.order[start:], batch_size), augmented, epoch)


def run_pass(steps: StepLoop, pipelines: Pipelines, plan: PassPlan, desc: str, epoch: int,
             batch_size: int, done: EpochProgress) -> Optional[Pause]:
    """Train ``plan`` from ``done.position`` on (StepLoop.run: None at its end, else the pause
    the ranks agreed on)."""
    batches = pass_batches(pipelines, plan, epoch, batch_size, done.position)
    return steps.run(plan, batches, num_batches(len(plan.order), batch_size, done.position),
                     desc, epoch, done)
