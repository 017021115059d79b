"""kill -9 of `dcluster train` at seeded random points (during training, clustering and
checkpoint writing, and around the MLflow store and run), then the same command again: the run
must end with exactly the weights of an uninterrupted run, every time, and MLflow with one run
holding one value per metric per epoch. Kill points are chosen by the log line the process has just
written, so where the kill lands varies a little from run to run; the property must hold
wherever it lands."""
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dcluster.runtime.checkpoint import load_latest
from helpers import SMALL_DEMO, assert_same_weights
from reference_runs import EPOCHS as REFERENCE_EPOCHS, train_args

KILLS = 10
EPOCHS = 3
# log lines after which the kill is sent: inside the clustering stage, right after it, right
# after an epoch's report (the checkpoint is being written), right after a checkpoint
# (the run logs at DEBUG, -v, so that the stages' own lines are there to choose from)
MARKERS = ("k-means on", "clustering:", "dcluster.harness: epoch", "saved checkpoint")


@pytest.fixture(scope="module")
def small_digits(demo_digits, tmp_path_factory) -> Path:
    """30 digits per class: enough to cluster, small enough for 20 process starts."""
    root = tmp_path_factory.mktemp("small") / "digits"
    for class_dir in sorted(p for p in demo_digits.iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:30]:
            shutil.copy(image, root / class_dir.name / image.name)
    return root


def command(data: Path, runs: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "dcluster", "-v", "train", "configs/demo.yaml", f"name={name}",
            f"data.path={data}", f"runs_root={runs}", f"epochs={EPOCHS}", *SMALL_DEMO,
            "tracking.enabled=false", "eval.class_kmeans=false", "threads=1"]


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


def final_weights(run_dir: Path) -> dict:
    found = load_latest(run_dir / "checkpoints")
    assert found is not None, f"no valid checkpoint in {run_dir}"
    payload, _ = found
    assert payload["epoch"] == EPOCHS
    return payload["model"]


def test_kill_9_at_random_points_then_resume_gives_the_uninterrupted_weights(small_digits,
                                                                              tmp_path):
    cwd = Path(__file__).resolve().parent.parent
    subprocess.run(command(small_digits, tmp_path, "straight"), check=True, cwd=cwd,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    expected = final_weights(tmp_path / "straight")
    rng = random.Random(20181008)
    for trial in range(KILLS):
        name = f"killed{trial}"
        marker = rng.choice(MARKERS)
        killed = run_killed_at(command(small_digits, tmp_path, name), marker,
                               rng.randint(1, EPOCHS))
        assert killed, f"trial {trial}: the run ended before {marker!r}"
        done = subprocess.run(command(small_digits, tmp_path, name), cwd=cwd, timeout=600,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert_same_weights(expected, final_weights(tmp_path / name),
                            f"the uninterrupted run (trial {trial}, kill after {marker!r})")


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
    logged_epoch = random.Random(20181008).randint(1, REFERENCE_EPOCHS)
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
    expected = {int(entry["epoch"]): entry for entry in payload["history"]}
    assert sorted(expected) == list(range(1, REFERENCE_EPOCHS + 1))
    for key in run.data.metrics:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert points == [(step, expected[step][key]) for step in sorted(expected)
                          if key in expected[step]], key
