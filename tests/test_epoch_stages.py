"""The harness runs a method's declared stages (harness.EpochRunner): in order, the skipped
ones not at all, a stop between two steps with the epoch-start checkpoint, a pass's pause as
an in-epoch checkpoint, and a resume that runs only the pass it stopped in (from its saved
position) and what follows. One process, real checkpoints; the stages only record."""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from dcluster.runtime.checkpoint import load_checkpoint
from dcluster.parallel.collectives import Comm
from dcluster.methods import Config
from dcluster.parallel.distributed import Env
from dcluster.harness import Checkpointer, EpochRunner
from dcluster.runtime.context import RunContext
from dcluster.runtime.optimize import StepLoop
from dcluster.runtime.run_state import Clusters, InterruptedEpoch, RunProgress
from dcluster.core.rundir import RunDir
from dcluster.runtime.stages import BatchLoss, Epoch, Pass, PassPlan, Stage, Step
from dcluster.runtime.stop import StopPoints, StopRequest, TrainingStopped

CPU = torch.device("cpu")


@dataclass
class Batch:
    indices: torch.Tensor
    next_position: int


class Recorder:
    """A method of five stages: three steps (the second skipped), a pass of 10 batches of 4
    images (each image's loss: the batch's number), a last step. It records what ran, and
    stands in for the loader (``train_batches``): the position each run of the pass started
    from."""
    metrics = ()
    scored_at = "end-of-epoch features"
    epochs = 1

    def __init__(self, request: StopRequest, stop_in_first_step: bool = False) -> None:
        self.model = nn.Linear(2, 2)
        self.request = request
        self.stop_in_first_step = stop_in_first_step
        self.ran: list[str] = []
        self.started_at: list[int] = []

    def share_state(self) -> None:
        pass

    def stages(self, epoch: Epoch) -> list[Stage]:
        return [Step("first", self.first, "time_first"),
                Step("skipped", lambda: self.ran.append("skipped"), "time_skipped", skip=True),
                Step("second", lambda: self.ran.append("second")),
                Pass("train", lambda: self.train(epoch)),
                Step("last", lambda: self.ran.append("last"))]

    def first(self) -> None:
        self.ran.append("first")
        if self.stop_in_first_step:
            self.request.signum = signal.SIGUSR2

    def train(self, epoch: Epoch) -> PassPlan:
        def loss_of(batch: Batch) -> BatchLoss:
            number = batch.next_position // 4
            return BatchLoss(self.model.weight.sum() * 0 + number, 4, {"batches": 1})

        def finish(totals: dict[str, int]) -> None:
            epoch.metrics["batches"] = float(totals["batches"])

        return PassPlan(np.arange(40), loss_of, [torch.optim.SGD(self.model.parameters(), 0.1)],
                        self.model, tallies=("batches",), finish=finish)

    def train_batches(self, order, epoch: int, batch_size: int, start: int) -> Iterator[Batch]:
        self.ran.append("train")
        self.started_at.append(start)
        for position in range(start, len(order), batch_size):
            yield Batch(torch.as_tensor(order[position:position + batch_size]),
                        position + batch_size)


def runner(tmp_path, method: Recorder, every_iterations: int = 0
           ) -> tuple[EpochRunner, Checkpointer]:
    comm = Comm(Env(rank=0, world_size=1, local_rank=0, device=CPU))
    cfg = Config()
    cfg.optim.batch_size = 4
    cfg.checkpoint.every_iterations = every_iterations
    stops = StopPoints(method.request, cfg.checkpoint, comm, CPU)
    ctx = RunContext(cfg, comm, RunDir(tmp_path), None, method, Clusters(), stops,  # type: ignore
                     StepLoop(CPU, "never", False, stops))
    checkpointer = Checkpointer(ctx, method, RunProgress(), {"model": method.model}, "hash",
                                "fingerprint", None)
    return EpochRunner(ctx, method, checkpointer), checkpointer


def test_the_stages_run_in_order_the_skipped_ones_not_and_every_step_is_timed(tmp_path):
    method = Recorder(StopRequest())
    epochs, _ = runner(tmp_path, method)
    metrics = epochs.run(0, None)
    assert method.ran == ["first", "second", "train", "last"]
    assert metrics["time_first"] > 0 and metrics["time_skipped"] == 0.0
    assert metrics["batches"] == 10.0 and metrics["images_trained"] == 40.0
    assert metrics["loss"] == 5.5  # the pass's mean loss, reported by the harness


def test_a_stop_between_two_steps_stops_with_the_epoch_start_checkpoint(tmp_path):
    method = Recorder(StopRequest(), stop_in_first_step=True)
    epochs, checkpointer = runner(tmp_path, method)
    with pytest.raises(TrainingStopped):
        epochs.run(0, None)
    assert method.ran == ["first"]
    assert (checkpointer.last.epoch, checkpointer.last.step) == (0, 0)
    assert load_checkpoint(checkpointer.last.path)["in_epoch"] is None


def test_a_paused_pass_is_checkpointed_and_resumes_alone_from_its_position(tmp_path):
    method = Recorder(StopRequest())
    epochs, checkpointer = runner(tmp_path, method, every_iterations=3)
    epochs.run(0, None)  # periodic pauses after iterations 3, 6 and 9: checkpointed, then on
    assert method.ran == ["first", "second", "train", "train", "train", "train", "last"]
    assert method.started_at == [0, 12, 24, 36]
    payload = load_checkpoint(checkpointer.last.path)
    assert payload["iteration"] == 1 + 9
    in_epoch = InterruptedEpoch(**payload["in_epoch"])
    assert (in_epoch.stage, in_epoch.offset) == (0, 0)
    assert in_epoch.progress(0).position == 36

    again = Recorder(StopRequest())
    resumed_epochs, _ = runner(tmp_path / "again", again)
    metrics = resumed_epochs.run(0, in_epoch)
    assert again.ran == ["train", "last"] and again.started_at == [36]
    # as if never paused: the tallies and the loss of the batches before the pause carry over
    assert metrics["batches"] == 10.0 and metrics["loss"] == 5.5
