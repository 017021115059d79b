"""The harness runs a method's declared stages (harness.EpochRunner): in order, the skipped
ones not at all, a stop between two steps with the epoch-start checkpoint, a pass's pause as
an in-epoch checkpoint, and a resume that runs only the pass it stopped in (from its saved
position) and what follows. One process, real checkpoints; the stages only record."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator, Optional

import pytest
import torch
from torch import nn

from dcluster.runtime.checkpoint import load_checkpoint
from dcluster.parallel.collectives import Comm
from dcluster.core.config import Config
from dcluster.parallel.distributed import Env
from dcluster.harness import Checkpointer, EpochRunner
from dcluster.runtime.context import RunContext
from dcluster.runtime.optimize import EpochProgress, Pause, StepLoop
from dcluster.runtime.run_state import Clusters, InterruptedEpoch, RunProgress
from dcluster.core.rundir import RunDir
from dcluster.runtime.stages import Epoch, Pass, Stage, Step, Train
from dcluster.runtime.stop import StopPoints, StopRequest, TrainingStopped

CPU = torch.device("cpu")


class Recorder:
    """A method of four stages: two steps (the second skipped), a pass of 10 iterations that
    pauses once after ``pause_after`` of them, a last step. It records what ran."""
    metrics = ()
    scored_at = "end-of-epoch features"
    epochs = 1

    def __init__(self, request: StopRequest, pause_after: Optional[int] = None,
                 stop_in_first_step: bool = False) -> None:
        self.model = nn.Linear(2, 2)
        self.request, self.pause_after = request, pause_after
        self.stop_in_first_step = stop_in_first_step
        self.ran: list[str] = []
        self.started_at: list[int] = []  # the position each run of the pass started from

    def share_state(self) -> None:
        pass

    def stages(self, epoch: Epoch) -> list[Stage]:
        return [Step("first", self.first, "time_first"),
                Step("skipped", lambda: self.ran.append("skipped"), "time_skipped", skip=True),
                Step("second", lambda: self.ran.append("second")),
                Pass("train", lambda done: self.train(epoch, done)),
                Step("last", lambda: self.ran.append("last"))]

    def first(self) -> None:
        self.ran.append("first")
        if self.stop_in_first_step:
            self.request.signum = signal.SIGUSR2

    @contextmanager
    def train(self, epoch: Epoch, done: EpochProgress) -> Iterator[Train]:
        self.started_at.append(done.position)

        def run() -> Optional[Pause]:
            self.ran.append("train")
            while done.iterations < 10:
                done.position += 4
                done.iterations += 1
                done.images += 4
                done.loss_sum += 4 * float(done.iterations)  # each image's loss: the iteration
                if done.iterations == self.pause_after:
                    self.pause_after = None
                    return Pause(0)
            return None

        yield run
        epoch.metrics["iterations"] = float(done.iterations)


def runner(tmp_path, method: Recorder) -> tuple[EpochRunner, Checkpointer]:
    comm = Comm(Env(rank=0, world_size=1, local_rank=0, device=CPU))
    cfg = Config()
    stops = StopPoints(method.request, cfg.checkpoint, comm, CPU)
    ctx = RunContext(cfg, comm, RunDir(tmp_path), None, None, Clusters(), stops,  # type: ignore
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
    assert metrics["iterations"] == 10.0 and metrics["images_trained"] == 40.0
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
    method = Recorder(StopRequest(), pause_after=3)
    epochs, checkpointer = runner(tmp_path, method)
    epochs.run(0, None)  # a periodic pause: checkpointed, then on
    assert method.ran == ["first", "second", "train", "train", "last"]
    payload = load_checkpoint(checkpointer.last.path)
    assert payload["iteration"] == 1 + 3
    in_epoch = InterruptedEpoch(**payload["in_epoch"])
    assert (in_epoch.stage, in_epoch.offset) == (0, 0)
    assert in_epoch.progress(0).position == 12

    again = Recorder(StopRequest())
    resumed_epochs, _ = runner(tmp_path / "again", again)
    metrics = resumed_epochs.run(0, in_epoch)
    assert again.ran == ["train", "last"] and again.started_at == [12]
    assert metrics["iterations"] == 10.0 and metrics["loss"] == 5.5  # as if never paused
