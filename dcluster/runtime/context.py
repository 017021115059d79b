"""The contract between a method and the harness that runs it: what a method is built from
(:class:`RunContext`), what it provides (:class:`Method`), and the stage timer both use.

A method's module imports this, not the harness: the harness sits at the top (it wires the
run's reporting, monitor and MLflow around the methods), and a method needs none of that.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch
from torch import nn

from dcluster.parallel.collectives import Comm
from dcluster.core.batch import BatchPlan, plan_batch
from dcluster.core.config import Config
from dcluster.data import ImageSource, Pipelines
from dcluster.parallel.execution import Execution
from dcluster.core.metric_spec import Metric
from dcluster.runtime.optimize import StepLoop
from dcluster.core.rundir import RunDir
from dcluster.runtime.run_state import Clusters, Stateful
from dcluster.runtime.stages import Epoch, Stage
from dcluster.runtime.stop import StopPoints


class Method(Protocol):
    """A training method on the harness; built as ``Method(ctx)``."""
    model: nn.Module  # the network: its buffers are saved per rank in mid-epoch checkpoints
    epochs: int  # the epochs of a whole run
    scored_at: str  # which network the epoch's cluster scores measure ("end-of-epoch features")
    metrics: Sequence[Metric]  # what its epochs measure, for the epoch line (epoch_report.py)

    @staticmethod
    def check_data(cfg: Config, n_images: int) -> None:
        """Raise ConfigError for settings the number of images rules out (k above it): called
        once the image list is known, before the run directory is made or an image decoded."""

    def state(self) -> dict[str, Stateful]:
        """The method's objects by checkpoint name, in the order a restore loads them."""

    def after_restore(self) -> None:
        """Called once the checkpoint's state is loaded (DeepCluster re-wraps DDP for the
        restored head)."""

    def share_state(self) -> None:
        """Called on every rank before a mid-epoch checkpoint: make what rank 0 writes hold
        every rank's part (MMDC's targets are updated by each rank for its own images), and
        what each rank writes to its shard files its own (DeepCluster's feature bank rows go
        to the ranks that own them)."""

    def stages(self, epoch: Epoch) -> list[Stage]:
        """Epoch ``epoch.number``'s stages, in order (stages.py). Called when the epoch starts
        and again when a run resumes inside it (then ``epoch.metrics`` is what it had
        measured): what it does besides declaring them is the epoch's set-up (MMDC's learning
        rate)."""


@dataclass
class RunContext:
    """What a method's epoch works with. The job (rank, world size, device) is read from
    ``comm`` alone."""
    cfg: Config
    comm: Comm
    run: RunDir
    source: ImageSource
    pipelines: Pipelines
    clusters: Clusters  # set by the method, reported and checkpointed by the harness
    stops: StopPoints
    steps: StepLoop  # the optimisation loop of every training pass

    @property
    def device(self) -> torch.device:
        return self.comm.env.device

    @property
    def batch(self) -> BatchPlan:
        """The training batch per process and the lr, from the config and the world size."""
        return plan_batch(self.cfg.optim, self.comm.world_size)

    @property
    def execution(self) -> Execution:
        """How the passes run on this rank's device (precision, memory format)."""
        assert self.steps.execution is not None
        return self.steps.execution

    @property
    def show(self) -> bool:
        """Progress bars and epoch lines: rank 0 only."""
        return self.comm.is_main


@contextmanager
def timed(metrics: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall time to ``metrics[key]`` (a stage paused and resumed adds up)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - start
