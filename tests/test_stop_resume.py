"""Cooperative stop on a signal (dcluster/runtime/stop.py) and mid-epoch checkpoints, with real
`dcluster train` processes (one process, and two gloo ranks): the stopped run exits with
128 + signal, leaves the checkpoint of exactly where the epoch stood, and the same command
then finishes with the weights, losses, pseudo-labels and training orders of a run that was
never stopped. Signals are sent by the process to itself at a patched point of the epoch loop
(tests/interrupts.py), so where they land is deterministic; nothing sleeps or measures time.

Runs use 400 of the demo digits (25 batches of 16 per epoch in one process, 13 per rank in
two), so most of each run is the interpreter's start-up.
"""
from __future__ import annotations

import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from mlflow import MlflowClient

from dcluster.runtime.checkpoint import checkpoint_name, load_checkpoint
from helpers import assert_same_weights
from ranks import RankOutcome, describe
from reference_runs import (BATCH, BATCHES, EPOCHS, IMAGES, RANK_BATCHES, Run, assert_same_run,
                            comparable, interrupted_command, new_dir, orders_of, recording,
                            run_pair, run_single, train_args)

EVERY = 5  # checkpoint.every_iterations of the periodic run


# ------------------------------------------------------------------------ one process

@dataclass(frozen=True)
class StopCase:
    point: str  # where the signal is sent (tests/interrupts.py)
    signame: str
    env: dict
    checkpoint: tuple[int, int]  # (epoch, step) of the checkpoint it stops with
    position: Optional[int]  # its position in the epoch's order; None: an epoch boundary
    resume_log: str  # how the rerun says where it continues
    clusterings_before: int  # clustering stages the stopped process completed

    @property
    def exit_code(self) -> int:
        return 128 + signal.Signals[self.signame]


STOP_CASES = [
    # mid training pass: after the iteration during which the signal arrived
    StopCase("train:1:5", "SIGUSR2", {}, (1, 6), 5 * BATCH,
             "inside epoch 2, after its iteration 5", clusterings_before=2),
    # during the clustering: the epoch is saved clustered, before its first iteration
    StopCase("clustering:2", "SIGTERM", {}, (2, 1), 0,
             "inside epoch 3, after its clustering", clusterings_before=3),
    # during the feature pass: nothing of the epoch is worth keeping, the boundary checkpoint
    # already written is the one to resume from; the preemption signal is the configured one
    StopCase("features:1", "SIGUSR1", {"SUBMITIT_PREEMPT_SIGNAL": "USR1"}, (1, 0), None,
             "after epoch 1", clusterings_before=1),
    # while `dcluster train` starts up, before the run's own handlers: recorded all the same,
    # the run stops at its first stop point (the feature pass cut short)
    StopCase("startup:0", "SIGTERM", {}, (0, 0), None, "after epoch 0", clusterings_before=0),
]


@pytest.mark.parametrize("case", STOP_CASES, ids=[c.point for c in STOP_CASES])
def test_a_stopped_run_checkpoints_where_it_stood_and_resumes_to_the_uninterrupted_result(
        case: StopCase, reference, digits_subset, tmp_path):
    name = f"stopped_{case.point.replace(':', '_')}"
    args = train_args(digits_subset, tmp_path / "runs", name)
    run = Run(tmp_path / "runs" / name, new_dir(tmp_path / "orders"))

    stopped = run_single(interrupted_command(case.point, case.signame, run.orders, args),
                         tmp_path / "stopped", **case.env)
    assert stopped.returncode == case.exit_code, stopped.output[-4000:]
    epoch, step = case.checkpoint
    expected = run.checkpoint(epoch, step).resolve()
    iterations = 0 if case.position is None else case.position // BATCH
    assert (f"stopped on {case.signame} in epoch {epoch + 1} after {iterations} iteration(s); "
            f"resume from {expected}") in stopped.output, stopped.output[-4000:]
    # the newest checkpoint is the one named; nothing was written after it
    assert run.checkpoint_names()[-1] == expected.name, run.checkpoint_names()
    assert run.clusterings() == case.clusterings_before

    payload = load_checkpoint(expected)
    assert (payload["epoch"], payload["iteration"]) == (epoch, step)
    assert [h["epoch"] for h in payload["history"]] == [float(e) for e in range(1, epoch + 1)]
    if case.position is None:
        assert payload["in_epoch"] is None
    else:
        in_epoch = payload["in_epoch"]
        # inside the training pass, with this epoch's clustering (its labels) in the checkpoint
        assert in_epoch["stage"] == 0 and payload["clusters"]["updated_epoch"] == epoch
        # the epoch's clustering measurements wait in the checkpoint for its report
        assert {"objective", "n_clusters", "time_clustering"} <= in_epoch["metrics"].keys()
        [rank] = in_epoch["ranks"]
        progress = rank["progress"]
        assert progress["position"] == case.position
        assert progress["iterations"] == iterations and progress["images"] == case.position
        assert (progress["loss_sum"] > 0) == (iterations > 0)
        assert {"python", "numpy", "torch"} <= rank["rng"].keys()
        labels = payload["clusters"]["labels"]
        assert labels.shape == (IMAGES,) and labels.min() >= 0

    resumed = run_single(recording(run.orders, args), tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert f"resuming from {expected} {case.resume_log}" in resumed.output, resumed.output[-4000:]
    # each epoch clustered exactly once, across both processes: a resume inside an epoch
    # does not cluster it again
    assert run.clusterings() == EPOCHS
    assert_same_run(reference, run)


# ------------------------------------------------------------- periodic mid-epoch checkpoints

@pytest.fixture(scope="module")
def periodic(digits_subset, tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("periodic")
    orders = new_dir(tmp / "orders")
    outcome = run_single(recording(orders, train_args(digits_subset, tmp / "runs", "periodic",
                                                      f"checkpoint.every_iterations={EVERY}")),
                         tmp / "logs")
    assert outcome.returncode == 0, outcome.output[-4000:]
    return Run(tmp / "runs" / "periodic", orders, outputs=[outcome.output])


def test_periodic_mid_epoch_checkpoints_are_written_without_changing_the_run(periodic,
                                                                             reference):
    # after every EVERY-th iteration of each epoch, named by 1 + iterations done; the last
    # (after iteration 25 of 25) is written between the training pass and the epoch's report
    steps = range(1 + EVERY, 2 + BATCHES, EVERY)
    expected = sorted([checkpoint_name(e, s) for e in range(EPOCHS) for s in steps]
                      + [checkpoint_name(e, 0) for e in range(1, EPOCHS + 1)])
    assert periodic.checkpoint_names() == expected
    for epoch in range(EPOCHS):
        for step in steps:
            payload = load_checkpoint(periodic.checkpoint(epoch, step))
            assert (payload["epoch"], payload["iteration"]) == (epoch, step)
            [rank] = payload["in_epoch"]["ranks"]
            progress = rank["progress"]
            assert progress["iterations"] == step - 1
            assert progress["position"] == min((step - 1) * BATCH, IMAGES)
    assert_same_run(reference, periodic)


@pytest.mark.parametrize("step", [1 + 2 * EVERY, 1 + BATCHES],
                         ids=["mid-pass", "after-the-last-iteration"])
def test_resuming_from_a_named_periodic_checkpoint_ends_like_the_uninterrupted_run(
        step, periodic, reference, digits_subset, tmp_path):
    """resume=<path> to a mid-epoch checkpoint, in a copy of the run whose later checkpoints
    are still there: the run continues from the named one, sets the later ones aside, and
    ends where the uninterrupted run did."""
    runs = tmp_path / "runs"
    shutil.copytree(periodic.root, runs / "periodic")  # runs_root changes nothing computed
    run = Run(runs / "periodic", new_dir(tmp_path / "orders"))
    start = run.checkpoint(1, step)
    outcome = run_single(recording(run.orders, train_args(
        digits_subset, runs, "periodic", f"checkpoint.every_iterations={EVERY}",
        f"resume={start}")), tmp_path / "logs")
    assert outcome.returncode == 0, outcome.output[-4000:]
    assert (f"resuming from {start.resolve()} inside epoch 2, after its iteration {step - 1}"
            in outcome.output), outcome.output[-4000:]
    assert run.clusterings() == EPOCHS - 2
    # the checkpoints of the abandoned timeline are renamed, not deleted
    assert run.checkpoints.joinpath(checkpoint_name(EPOCHS, 0) + ".superseded").is_file()
    assert_same_weights(reference.final()["model"], run.final()["model"])
    assert comparable(run.final()["history"]) == comparable(reference.final()["history"])
    # this process trained on the rest of epoch 1 and on epoch 2, exactly
    want, have = orders_of(reference.orders), orders_of(run.orders)
    assert have.get("rank0-epoch1.txt", []) == want["rank0-epoch1.txt"][step - 1:]
    assert have["rank0-epoch2.txt"] == want["rank0-epoch2.txt"]
    assert "rank0-epoch0.txt" not in have


# -------------------------------------------------------------------------------- two ranks

PAIR_POINT = "train:1:7"
PAIR_STEP = 8  # the checkpoint after 7 iterations


@pytest.fixture(scope="module")
def pair_stopped(digits_subset, tmp_path_factory) -> tuple[Run, Path, list[RankOutcome]]:
    """Two ranks, SIGUSR2 to rank 0 alone in the middle of epoch 1, with MLflow tracking on:
    the run, an untouched copy of its runs_root, and the ranks' outcomes."""
    tmp = tmp_path_factory.mktemp("pair_stopped")
    orders = new_dir(tmp / "orders")
    args = train_args(digits_subset, tmp / "runs", "pair_stopped", "tracking.enabled=true")
    outcomes = run_pair(["--interrupt", PAIR_POINT, "--record-orders", str(orders)], args,
                        tmp / "logs")
    shutil.copytree(tmp / "runs", tmp / "pristine")
    return Run(tmp / "runs" / "pair_stopped", orders), tmp / "pristine", outcomes


def test_two_ranks_stop_together_on_one_ranks_signal_and_resume_to_the_same_weights(
        pair_stopped, pair_reference, digits_subset):
    run, pristine, outcomes = pair_stopped
    # rank 1 got no signal, yet stops after the same iteration, through the flag all-reduce
    assert [o.returncode for o in outcomes] == [140, 140], describe(outcomes)
    checkpoint = run.checkpoint(1, PAIR_STEP).resolve()
    assert run.checkpoint_names()[-1] == checkpoint.name
    for outcome in outcomes:
        assert "stopped on SIGUSR2 in epoch 2 after 7 iteration(s)" in outcome.output
    payload = load_checkpoint(checkpoint)
    ranks = payload["in_epoch"]["ranks"]
    progress = [r["progress"] for r in ranks]
    assert [(p["position"], p["iterations"], p["images"]) for p in progress] == \
        [(7 * BATCH, 7, 7 * BATCH)] * 2
    # each rank's own dropout stream, saved separately
    assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])
    orders = orders_of(run.orders)
    assert [len(orders[f"rank{r}-epoch1.txt"]) for r in range(2)] == [7, 7]

    args = train_args(digits_subset, run.root.parent, "pair_stopped", "tracking.enabled=true")
    resumed = run_pair(["--record-orders", str(run.orders)], args,
                       run.root.parent.parent / "resumed")
    assert [o.returncode for o in resumed] == [0, 0], describe(resumed)
    assert "inside epoch 2, after its iteration 7" in resumed[0].output, describe(resumed)
    assert [len(lines) for lines in orders_of(run.orders).values()] == [RANK_BATCHES] * 2 * EPOCHS
    assert_same_run(pair_reference, run)

    # one MLflow run across both sessions: KILLED when stopped (as the untouched copy shows),
    # continued and finished, and each epoch's metrics logged once
    stopped_store = MlflowClient(f"sqlite:///{pristine / 'mlflow.db'}")
    assert stopped_store.get_run(payload["mlflow_run_id"]).info.status == "KILLED"
    client = MlflowClient(f"sqlite:///{run.root.parent / 'mlflow.db'}")
    mlflow_runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(mlflow_runs) == 1 and mlflow_runs[0].info.status == "FINISHED"
    assert mlflow_runs[0].info.run_id == payload["mlflow_run_id"]
    losses = client.get_metric_history(payload["mlflow_run_id"], "loss")
    assert sorted(m.step for m in losses) == list(range(1, EPOCHS + 1))
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == \
        [h["loss"] for h in pair_reference.final()["history"]]
    # the throughput telemetry goes to MLflow too, once an epoch
    for key in ("speed_train_img_s", "speed_features_img_s", "speed_host_mem_gb"):
        speeds = client.get_metric_history(payload["mlflow_run_id"], key)
        assert sorted(m.step for m in speeds) == list(range(1, EPOCHS + 1)), key
        assert all(m.value > 0 for m in speeds), key


def test_a_two_rank_mid_epoch_checkpoint_refuses_to_resume_in_one_process(
        pair_stopped, digits_subset, tmp_path):
    _, pristine, outcomes = pair_stopped
    assert [o.returncode for o in outcomes] == [140, 140], describe(outcomes)
    runs = tmp_path / "runs"
    shutil.copytree(pristine, runs)
    run = Run(runs / "pair_stopped", new_dir(tmp_path / "orders"))
    before = run.checkpoint_names()
    outcome = run_single(recording(run.orders, train_args(digits_subset, runs, "pair_stopped",
                                                          "tracking.enabled=true")),
                         tmp_path / "logs")
    assert outcome.returncode == 2, outcome.output[-4000:]
    checkpoint = run.checkpoint(1, PAIR_STEP).resolve()
    assert (f"dcluster train: error: {checkpoint}: saved in the middle of epoch 2 by 2 rank(s), "
            "this run has 1: resume it with 2") in outcome.output, outcome.output[-4000:]
    assert "Traceback" not in outcome.output
    # it failed before doing any work, and wrote nothing
    assert run.clusterings() == 0 and not orders_of(run.orders)
    assert run.checkpoint_names() == before
