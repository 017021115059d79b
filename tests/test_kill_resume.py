"""kill -9 of `dcluster train` at seeded random points (during training, clustering and
checkpoint writing), then the same command again: the run must end with exactly the weights of
an uninterrupted run, every time. Kill points are chosen by the log line the process has just
written, so where the kill lands varies a little from run to run; the property must hold
wherever it lands."""
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dcluster.checkpoint import load_latest
from helpers import SMALL_DEMO, assert_same_weights

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
