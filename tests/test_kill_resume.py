"""kill -9 of `dcluster train` inside every stage of an epoch, and around the MLflow store
and run, then the same command again: the run must end with exactly the weights of an
uninterrupted run, and MLflow with one run holding the final history's values, no more and
no fewer.

The stage kills are sent by the process itself at a named point (tests/interrupts.py, through
tests/rank_main.py), so each lands exactly where its name says: two per stage, in two
different epochs drawn with a fixed seed, and a training batch drawn from the epoch's. The
tracking kills follow the log line the process has just written."""
import math
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dcluster.runtime.checkpoint import SIDECAR_SUFFIX, checkpoint_name, load_latest
from helpers import assert_same_weights
from interrupts import parse_point
from ranks import rank_command
from reference_runs import BATCHES, EPOCHS, run_single, train_args

# where an epoch can be killed (tests/interrupts.py): its feature pass, its clustering, its
# training pass at a batch, its report, and the writing of its checkpoint
KILL_STAGES = ("features", "clustering", "train", "report", "checkpoint")
KILLS_PER_STAGE = 2


def kill_points(rng: random.Random) -> list[str]:
    """KILLS_PER_STAGE points in each stage, in as many different epochs: distinct by
    construction. Each lies before the final checkpoint's commit (the last is inside it),
    so every rerun has an epoch left to train."""
    points = []
    for stage in KILL_STAGES:
        for epoch in sorted(rng.sample(range(EPOCHS), KILLS_PER_STAGE)):
            points.append(f"train:{epoch}:{rng.randint(1, BATCHES)}" if stage == "train"
                          else f"{stage}:{epoch}")
    return points


KILL_POINTS = kill_points(random.Random(20181008))


def test_the_kill_points_are_distinct_and_docs_testing_md_names_exactly_them():
    assert len(set(KILL_POINTS)) == len(KILL_STAGES) * KILLS_PER_STAGE
    testing = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    stages = "|".join(KILL_STAGES)
    assert sorted(re.findall(rf"`((?:{stages}):[0-9:]+)`", testing)) == sorted(KILL_POINTS)


def committed_epochs(run: Path) -> int:
    """The epochs the newest committed checkpoint of ``run`` holds (0: none)."""
    found = load_latest(run / "checkpoints")
    return 0 if found is None else found[0]["epoch"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_inside_a_stage_then_resume_gives_the_uninterrupted_weights(
        point, reference, digits_subset, tmp_path):
    """The session's reference run, SIGKILLed at ``point`` (epochs from 0), then run again."""
    stage, epoch, _ = parse_point(point)
    run = tmp_path / "runs" / "killed"
    args = train_args(digits_subset, run.parent, run.name)
    killed = run_single(rank_command("--interrupt", point, "--signal", "SIGKILL", *args),
                        tmp_path / "killed")
    assert killed.returncode == -signal.SIGKILL, killed.output[-3000:]
    # killed inside epoch `epoch`, before its checkpoint was committed
    assert committed_epochs(run) == epoch
    if stage == "checkpoint":  # the data file complete, its commit marker never written
        written = run / "checkpoints" / checkpoint_name(epoch + 1, 0)
        assert written.is_file() and not written.with_name(written.name + SIDECAR_SUFFIX).exists()

    done = run_single([sys.executable, "-m", "dcluster", *args], tmp_path / "resumed")
    assert done.returncode == 0, done.output[-3000:]
    payload, _ = load_latest(run / "checkpoints")
    assert payload["epoch"] == EPOCHS
    assert_same_weights(reference.final()["model"], payload["model"],
                        f"the uninterrupted run (killed at {point})")


def run_killed_at(cmd: list[str], marker: str, occurrence: int) -> bool:
    """Run `cmd` and SIGKILL it right after the `occurrence`-th log line holding `marker`;
    returns whether the kill happened (the run may finish first)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    seen = 0
    try:
        for line in proc.stderr:
            seen += marker in line
            if seen == occurrence:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None and seen < occurrence:
            proc.wait(timeout=300)
        proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    return seen == occurrence


def metric_points(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What MLflow must hold of a run's history: every metric's (epoch, value) at every epoch
    that has it, except non-finite values, which the tracker does not log."""
    points: dict[str, list[tuple[int, float]]] = {}
    for entry in history:
        for key, value in entry.items():
            if key != "epoch" and math.isfinite(float(value)):
                points.setdefault(key, []).append((int(entry["epoch"]), float(value)))
    return points


# kill points of the tracking store and run: inside the store's first creation (MLflow's own
# line as its migrations start), right after MLflow created the run (its id not yet written,
# or just), and between an epoch's metrics reaching MLflow and its checkpoint's commit
TRACKING_KILLS = (("Updating database tables", 1), ("MLflow run", 1))
LOGGED = "metric(s) logged at step {epoch}"


def test_kill_9_around_tracking_then_resume_leaves_one_finished_run_with_one_value_per_epoch(
        reference, digits_subset, tmp_path):
    """The runs root's first store creation, the start-up before the first checkpoint and
    the moment between logging and committing are each killed, then the newest checkpoint
    is corrupted (the run redoes its last epoch): the store still opens and holds one
    FINISHED run for the run directory, with exactly the final history's values."""
    cwd = Path(__file__).resolve().parent.parent
    runs, name = tmp_path / "runs", "tracked"
    cmd = [sys.executable, "-m", "dcluster", "-v",
           *train_args(digits_subset, runs, name, "tracking.enabled=true", "tracking.plots=false")]
    logged_epoch = random.Random(20181008).randint(1, EPOCHS)
    for marker, occurrence in (*TRACKING_KILLS, (LOGGED.format(epoch=logged_epoch), 1)):
        assert run_killed_at(cmd, marker, occurrence), f"the run ended before {marker!r}"
        store = runs / "mlflow.db"  # no store, or a whole one that opens
        assert not store.exists() or MlflowClient(f"sqlite:///{store}").search_experiments()
    for attempt in ("finish", "redo the corrupted last epoch"):
        if attempt != "finish":
            _, newest = load_latest(runs / name / "checkpoints")
            data = bytearray(newest.read_bytes())
            data[len(data) // 2] ^= 0xFF
            newest.write_bytes(data)
        done = subprocess.run(cmd, cwd=cwd, timeout=600, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        assert done.returncode == 0, f"{attempt}: {done.stderr[-3000:]}"

    payload, _ = load_latest(runs / name / "checkpoints")
    assert_same_weights(reference.final()["model"], payload["model"])
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.info.run_id == payload["mlflow_run_id"]
    assert (runs / name / "mlflow_run_id").read_text() == run.info.run_id
    assert [int(entry["epoch"]) for entry in payload["history"]] == list(range(1, EPOCHS + 1))
    # both ways: a metric or an epoch lost by MLflow fails as surely as one too many
    logged = {key: sorted((m.step, m.value)
                          for m in client.get_metric_history(run.info.run_id, key))
              for key in run.data.metrics}
    assert logged == metric_points(payload["history"])
