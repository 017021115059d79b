"""The run directory: created, reused for the same run, refused or moved aside otherwise."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from dcluster.core.config import flatten, keys_in_yaml_file
from dcluster.methods import Config
from dcluster.core.rundir import RunDirError, attach_log_file, prepare_run_dir, save_assignments


def _cfg(tmp_path: Path, **changes) -> Config:
    cfg = Config(name="exp", runs_root=str(tmp_path / "runs"))
    cfg.data.path = str(tmp_path)
    cfg.clustering.k = 100
    return dataclasses.replace(cfg, **changes)


def test_new_run_creates_the_layout_and_config(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    run_dir = prepare_run_dir(cfg)
    assert run_dir.root == (tmp_path / "runs" / "exp").resolve()
    for sub in (run_dir.checkpoints, run_dir.assignments, run_dir.plots):
        assert sub.is_dir()
    assert keys_in_yaml_file(run_dir.config_path, Config) == flatten(cfg)


def test_same_config_resumes_and_takes_new_execution_keys(tmp_path: Path) -> None:
    first = prepare_run_dir(_cfg(tmp_path))
    (first.checkpoints / "marker").write_text("kept")
    again = prepare_run_dir(_cfg(tmp_path, epochs=900))
    assert again.root == first.root
    assert (again.checkpoints / "marker").read_text() == "kept"
    assert keys_in_yaml_file(again.config_path, Config)["epochs"] == 900


def test_different_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    prepare_run_dir(_cfg(tmp_path))
    other = _cfg(tmp_path)
    other.clustering.k = 200
    with pytest.raises(RunDirError, match=r"clustering\.k: 100 -> 200"):
        prepare_run_dir(other)


def test_overwrite_moves_the_old_run_aside(tmp_path: Path) -> None:
    old = prepare_run_dir(_cfg(tmp_path))
    (old.checkpoints / "ckpt").write_text("old run")
    other = _cfg(tmp_path, overwrite=True)
    other.clustering.k = 200

    new = prepare_run_dir(other)
    moved = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("exp.old-")]
    assert len(moved) == 1
    assert (moved[0] / "checkpoints" / "ckpt").read_text() == "old run"
    assert keys_in_yaml_file(moved[0] / "config.yaml", Config)["clustering.k"] == 100
    assert not (new.checkpoints / "ckpt").exists()
    assert keys_in_yaml_file(new.config_path, Config)["clustering.k"] == 200


def test_resume_never_refuses_an_existing_run_unless_overwrite(tmp_path: Path) -> None:
    prepare_run_dir(_cfg(tmp_path))
    with pytest.raises(RunDirError, match="resume=auto.*overwrite=true"):
        prepare_run_dir(_cfg(tmp_path, resume="never"))
    new = prepare_run_dir(_cfg(tmp_path, resume="never", overwrite=True))
    assert not (new.checkpoints / "marker").exists()
    assert any(p.name.startswith("exp.old-") for p in (tmp_path / "runs").iterdir())


def test_foreign_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "runs" / "exp"
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="no config.yaml"):
        prepare_run_dir(_cfg(tmp_path))


def test_assignments_and_log_file(tmp_path: Path) -> None:
    run_dir = prepare_run_dir(_cfg(tmp_path))
    labels = np.random.default_rng(0).integers(0, 100, 1000)
    path = save_assignments(run_dir, 4, labels)
    np.testing.assert_array_equal(np.load(path), labels)
    assert path.name == "epoch_000004.npy"

    logger = logging.getLogger("dcluster.test")
    handler = attach_log_file(run_dir)
    try:
        assert attach_log_file(run_dir) is handler  # idempotent: no duplicated lines
        logger.warning("hello from the run")
        handler.flush()
        line = run_dir.log_path.read_text().strip()
        assert line.endswith("WARNING dcluster.test: hello from the run")
    finally:
        logging.getLogger("dcluster").removeHandler(handler)
        handler.close()
