"""The training pass's pause protocol (dcluster/runtime/optimize.py, dcluster/runtime/stop.py) when ranks have
uneven inputs: a batch whose images are all unreadable is skipped, so one rank runs out of
batches early and sits in DDP's join while the others train on. The flag poll must then be
shadowed too, a stop or a periodic checkpoint decided by the ranks still training must reach
the finished one, and a pass paused and continued must train exactly like one that was not.

Two spawned gloo ranks, a real image folder with zero-byte files, the real DALI loader, real
DDP. Rank 0 trains 4 batches of 8 readable images; rank 1's slice holds 8 readable, then 8
unreadable (a skipped batch), then 8 readable images: 2 iterations.
"""
from __future__ import annotations

import functools
import json
import signal
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcluster.parallel.collectives import Comm
from dcluster.core.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig
from dcluster.data import build_pipelines, open_source
from dcluster.parallel.distributed import Env
from dcluster.models import build_model
from dcluster.runtime.optimize import EpochProgress, StepLoop, data_parallel, sgd
from dcluster.runtime.passes import run_pass as train_plan
from dcluster.runtime.stages import BatchLoss, PassPlan
from dcluster.runtime.stop import StopPoints, StopRequest
from helpers import assert_same_weights
from images import write_photo, write_zero_byte
from ranks import spawn_ranks

BATCH = 8
GOOD, BAD = 48, 8
ORDERS = [list(range(0, 32)),  # rank 0: 4 batches
          [*range(32, 40), *range(GOOD, GOOD + BAD), *range(40, 48)]]  # rank 1: 2 trained
CLUSTERS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Indices follow the sorted names: a000..a047 readable, b000..b007 zero bytes."""
    root = tmp_path_factory.mktemp("uneven")
    for n in range(GOOD):
        write_photo(root / f"a{n:03d}.jpg", n)
    for n in range(BAD):
        write_zero_byte(root / f"b{n:03d}.jpg")
    return root


class SignalAtBatch:
    """Pipelines whose training pass sends this process ``signum`` just before its batch
    number ``at`` (from 1), through the real handler of the StopRequest in force."""

    def __init__(self, pipelines, at: Optional[int]) -> None:
        self.pipelines = pipelines
        self.at = at

    def train_batches(self, order, epoch, batch_size, start_position=0) -> Iterator:
        for number, batch in enumerate(self.pipelines.train_batches(
                order, epoch, batch_size, start_position), start=1):
            if number == self.at:
                signal.raise_signal(signal.SIGUSR2)
            yield batch


def train_pass(images: Path, out: Path, every_iterations: int, stop_at: Optional[int],
               poll_every: int, comm: Comm) -> None:
    """One training pass of this rank's order, continued after each pause that is only for
    a checkpoint; writes what each call returned, the progress and rank 0's weights."""
    torch.manual_seed(0)
    env = Env(comm.rank, comm.world_size, 0, torch.device("cpu"))
    data = DataConfig(path=str(images), crop_size=32, resize_size=32, workers=1,
                      max_bad_fraction=0.5)
    source = open_source(data)
    pipelines = build_pipelines(source, data, seed=0)
    model = build_model(ModelConfig(arch="smallconv", width=8, fc_dim=32, dropout=0.5,
                                    fc_init="fan_in"), 32)
    head = model.reset_head(CLUSTERS, torch.Generator().manual_seed(1))
    optim = OptimConfig(lr=0.01, momentum=0.9, weight_decay=1e-5, batch_size=BATCH)
    optimizers = [sgd([p for n, p in model.named_parameters() if not n.startswith("head.")],
                      optim, 0.01), sgd(head.parameters(), optim, 0.01)]
    net = data_parallel(model, env)
    labels = torch.arange(len(source)) % CLUSTERS

    def loss_of(batch) -> BatchLoss:
        return BatchLoss(F.cross_entropy(net(batch.images), labels[batch.indices]),
                         len(batch.indices))

    plan = PassPlan(np.array(ORDERS[comm.rank]), loss_of, optimizers, net)
    done = EpochProgress()
    pauses = []
    with StopRequest() as request:
        stops = StopPoints(request, CheckpointConfig(every_iterations=every_iterations,
                                                     poll_every=poll_every), comm)
        loader = SignalAtBatch(pipelines, stop_at if comm.rank == 0 else None)
        while True:
            pause = train_plan(StepLoop(env.device, "never", False, stops), loader, plan, "train",
                             0, BATCH, done)
            pauses.append(pause.signum if pause else None)
            if pause is None or pause.signum:
                break
    (out / f"rank{comm.rank}.json").write_text(json.dumps(
        {"pauses": pauses, "position": done.position, "iterations": done.iterations,
         "images": done.images}))
    if comm.rank == 0:
        torch.save(model.state_dict(), out / "weights.pt")


def run_pass(folder: Path, tmp_path: Path, every_iterations: int = 0,
             stop_at: Optional[int] = None, poll_every: int = 0) -> tuple[list[dict], dict]:
    out = tmp_path / f"every{every_iterations}-stop{stop_at}-poll{poll_every}"
    out.mkdir()
    spawn_ranks(functools.partial(train_pass, folder, out, every_iterations, stop_at,
                                  poll_every), 2)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, torch.load(out / "weights.pt")


def test_a_rank_that_ran_out_early_learns_of_the_stop_and_nobody_hangs(folder, tmp_path):
    ranks, _ = run_pass(folder, tmp_path, stop_at=4)  # rank 1 joined after its 2nd iteration
    assert [r["pauses"] for r in ranks] == [[signal.SIGUSR2], [signal.SIGUSR2]]
    assert (ranks[0]["position"], ranks[0]["iterations"], ranks[0]["images"]) == (32, 4, 32)
    assert (ranks[1]["position"], ranks[1]["iterations"], ranks[1]["images"]) == (24, 2, 16)


def test_a_stop_agreed_every_n_iterations_stops_both_ranks_after_the_same_iteration(
        folder, tmp_path):
    """checkpoint.poll_every=3: the signal reaches rank 0 in its 2nd iteration, the ranks agree
    after the 3rd, by which rank 1 has run out (the shadow of its poll counts the iterations
    it shadows, so it answers the poll after the 3rd and no other)."""
    ranks, _ = run_pass(folder, tmp_path, stop_at=2, poll_every=3)
    assert [r["pauses"] for r in ranks] == [[signal.SIGUSR2], [signal.SIGUSR2]]
    assert (ranks[0]["position"], ranks[0]["iterations"], ranks[0]["images"]) == (24, 3, 24)
    assert (ranks[1]["position"], ranks[1]["iterations"], ranks[1]["images"]) == (24, 2, 16)


def test_a_periodic_pause_with_a_finished_rank_continues_to_the_same_weights(folder, tmp_path):
    straight, straight_weights = run_pass(folder, tmp_path)
    assert [r["pauses"] for r in straight] == [[None], [None]]
    # every 3 iterations: rank 0 pauses after its 3rd, when rank 1 has already run out
    paused, paused_weights = run_pass(folder, tmp_path, every_iterations=3)
    assert [r["pauses"] for r in paused] == [[0, None], [0, None]]
    for rank in range(2):
        assert paused[rank] | {"pauses": None} == straight[rank] | {"pauses": None}
    assert_same_weights(straight_weights, paused_weights, "the pass that was not paused")
