"""benchmarks/mnist_curves.py (the results page's per-epoch curves) reads a run's history from
its newest checkpoint: here the legacy fixture's run (one epoch of the demo method)."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "mnist_curves.py"
RUN = ROOT / "tests" / "fixtures" / "legacy_0dd45d7" / "run"


def test_curves_come_from_the_newest_checkpoints_history(tmp_path):
    run = Path(shutil.copytree(RUN, tmp_path / "legacy"))
    out = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, str(SCRIPT), str(run), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["runs"]["legacy"]["epochs"] == 1
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_checkpoints_is_a_one_line_error(tmp_path):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "empty")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "no checkpoint to read a history from" in done.stderr


def test_an_over_clustering_run_is_drawn_without_an_acc():
    spec = importlib.util.spec_from_file_location("mnist_curves", SCRIPT)
    curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curves)
    over = dict(curves.series_of([{"epoch": 1, "n_clusters": 50}]))
    assert "acc_classes" not in over and over["nmi_classes"] == "NMI of its k = 50 clusters"
    assert curves.series_of([{"epoch": 1, "n_clusters": 10}]) == list(curves.SERIES)
