"""Every error a user can make and fix ends the command with exit code 2 and one line naming
the key, file or value, no traceback, and leaves nothing on disk that the corrected command
would trip on. The commands run through dcluster's real entry point (`dcluster.cli.main`)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from dcluster.runtime.checkpoint import load_latest
from dcluster.cli import main
from helpers import SMALL_DEMO

REPO = Path(__file__).resolve().parent.parent


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *names: str) -> str:
    """Exit 2, exactly one error line, holding every one of ``names``; returns the line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if ": error: " in line]
    for name in names:
        assert name in line, line
    return line


def train_argv(data: Path, runs: Path, *extra: str) -> list[str]:
    return ["train", "configs/demo.yaml", f"data.path={data}", f"runs_root={runs}", *SMALL_DEMO,
            "epochs=1", *extra]


@pytest.mark.parametrize("config, overrides, names", [
    ("configs/demo.yaml", ["clustering.k=5000"], ["'clustering.k' = 5000", "1797 images"]),
    ("configs/demo.yaml", ["clustering.method=pic", "clustering.pic.knn=1797"],
     ["'clustering.pic.knn' = 1797", "1797 images"]),
    ("configs/mmdc_demo.yaml", ["mmdc.k=1798"], ["'mmdc.k' = 1798", "1797"]),
], ids=["kmeans-k", "pic-knn", "mmdc-k"])
def test_k_above_the_number_of_images_is_refused_before_any_image_is_decoded(
        config, overrides, names, demo_digits, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(capsys, "train", config, f"data.path={demo_digits}",
                           f"runs_root={runs}", "progress=never", *overrides)
    assert_one_error_line(code, err, *names)
    assert not runs.exists()  # no run directory that the corrected rerun would refuse


def test_a_runs_root_below_a_file_is_named(demo_digits, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a directory")
    code, _, err = run_cli(capsys, *train_argv(demo_digits, blocker / "runs"))
    assert_one_error_line(code, err, "'runs_root'", f"{blocker} is a file")
    assert blocker.read_text() == "not a directory"


def test_a_value_of_the_wrong_type_names_the_expected_type(demo_digits, tmp_path, capsys):
    code, _, err = run_cli(capsys, *train_argv(demo_digits, tmp_path, "epochs=abc"))
    assert_one_error_line(code, err, "'epochs'", "'abc'", "expected int")
    code, _, err = run_cli(capsys, *train_argv(demo_digits, tmp_path, "optim.lr=fast"))
    assert_one_error_line(code, err, "'optim.lr'", "expected float")


def test_eval_with_overrides_for_another_network_names_both(reference, capsys):
    code, _, err = run_cli(capsys, "eval", "knn", str(reference.root), "model.width=16",
                           "data.crop_size=24")
    assert_one_error_line(code, err, "smallconv", "model.width=16", "model.width=8",
                          "data.crop_size=24")
    assert not (reference.root / "eval").exists()


def test_eval_of_a_checkpoint_that_does_not_fit_its_run_config_names_the_model(
        reference, tmp_path, capsys):
    """A checkpoint copied into the run directory of a wider network."""
    other = tmp_path / "runs" / "wider"
    (other / "checkpoints").mkdir(parents=True)
    config = (reference.root / "config.yaml").read_text()
    assert "width: 8\n" in config
    (other / "config.yaml").write_text(config.replace("width: 8\n", "width: 16\n"))
    _, newest = load_latest(reference.checkpoints)
    for path in (newest, newest.with_name(newest.name + ".sha256")):
        shutil.copy(path, other / "checkpoints" / path.name)
    code, _, err = run_cli(capsys, "eval", "knn", str(other))
    assert_one_error_line(code, err, "smallconv", "width 16", "do not fit")


def test_eval_k_above_the_train_split_is_refused(reference, capsys):
    code, _, err = run_cli(capsys, "eval", "knn", str(reference.root), "eval.knn.k=100000")
    assert_one_error_line(code, err, "'eval.knn.k' = 100000", "train split")


def test_a_dry_run_needs_no_slurm_commands(demo_digits, tmp_path, capsys, monkeypatch):
    """A laptop preparing a job: no srun or sbatch on PATH."""
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert shutil.which("srun") is None
    code, out, err = run_cli(capsys, "submit", "configs/demo.yaml", f"data.path={demo_digits}",
                             f"runs_root={tmp_path}", "--nodes", "2", "--dry-run")
    assert code == 0, err
    assert "#SBATCH --nodes=2" in out and "srun" in out
    assert not list(tmp_path.iterdir())  # a dry run prepares nothing


@pytest.mark.parametrize("override, suggested", [
    ("optim.lr_scale=linear", "(did you mean optim.lr_scaling?)"),
    ("clustering.kk=3", "(did you mean clustering.k?)"),
    ("lr=0.1", "(did you mean optim.lr or eval.linear.lr?)"),
    ("clustring.k=3", "(did you mean clustering?)"),
    ("zzzz.qqq=1", "`dcluster train --help` lists all"),
])
def test_an_unknown_key_suggests_the_closest_declared_ones(override, suggested, demo_digits,
                                                             tmp_path, capsys):
    code, _, err = run_cli(capsys, *train_argv(demo_digits, tmp_path, override))
    typed = override.split("=")[0]
    line = assert_one_error_line(code, err, "unknown config key", typed.split(".")[0], suggested)
    assert "optim.momentum" not in line  # the closest ones, not all of them
