"""The run directory ``<runs_root>/<name>/``: one place per run for everything it leaves behind.

A run is identified by its name, so the directory must refuse to mix two runs: a rerun under
the same name with a config that computes something else would resume from checkpoints of the
other run. Such a directory is refused unless overwrite is asked for, and then it is moved
aside, never deleted: a wrong command line should not cost a week of training.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcluster.core.atomic import atomic_write, atomic_write_bytes, remove_stale_temps
from dcluster.core.config import Config, flatten, keys_in_yaml_file, to_yaml
from dcluster.core.config_settings import describe_changes, hashed_settings, setting_changes
from dcluster.core.errors import UserError
from dcluster.core.logs import LOG_FORMAT

log = logging.getLogger(__name__)


class RunDirError(RuntimeError, UserError):
    """The run directory holds something this run must not reuse; the message says what."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.root / "train.log"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def assignments(self) -> Path:
        return self.root / "assignments"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def uid_path(self) -> Path:
        return self.root / "run_uid"

    @property
    def mlflow_run_id_path(self) -> Path:
        return self.root / "mlflow_run_id"

    def uid(self) -> str:
        """This directory's identity: a run moved aside by overwrite=true and the new one in
        its place share a path, never a uid (their MLflow runs are told apart by it)."""
        return self.uid_path.read_text().strip()

    def mlflow_run_id(self) -> str | None:
        """The id of the directory's MLflow run, once one was created."""
        path = self.mlflow_run_id_path
        return path.read_text().strip() or None if path.is_file() else None


def prepare_run_dir(cfg: Config) -> RunDir:
    """Create the run directory, or reuse it for a resume of the same run; see the module doc.

    Only rank 0 should call this (it may rename directories); other ranks build
    ``RunDir(root)`` from the path once rank 0 is done.
    """
    check_runs_root(Path(cfg.runs_root))
    root = (Path(cfg.runs_root) / cfg.name).resolve()
    resumed = False
    if root.exists() and any(root.iterdir()):
        problem = _reuse_problem(root, cfg)
        if problem and not cfg.overwrite:
            raise RunDirError(f"run directory {root}: {problem}")
        if problem:
            _move_aside(root, problem)
        else:
            resumed = True
    run_dir = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    # config.yaml first: it is what marks a directory as holding a run, so a kill before the
    # sub-directories exist leaves a directory that is recognised on the next start.
    atomic_write_bytes(run_dir.config_path, to_yaml(cfg).encode())
    if not run_dir.uid_path.is_file():
        atomic_write_bytes(run_dir.uid_path, uuid.uuid4().hex.encode())
    for sub in (run_dir.checkpoints, run_dir.assignments, run_dir.plots):
        sub.mkdir(exist_ok=True)
    log.info("%s run directory %s", "resuming in" if resumed else "created", root)
    return run_dir


def check_runs_root(runs_root: Path) -> None:
    """Refuse a runs_root that cannot hold run directories, before anything is created: its
    nearest existing ancestor (itself, once it exists) must be a writable directory."""
    for existing in (runs_root, *runs_root.absolute().parents):
        if existing.exists():
            break
    if not existing.is_dir():
        raise RunDirError(f"config key 'runs_root' = {str(runs_root)!r}: {existing} is a file, "
                          "not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"config key 'runs_root' = {str(runs_root)!r}: {existing} is not "
                          "writable by this user")


def _reuse_problem(root: Path, cfg: Config) -> str | None:
    """Why the non-empty directory `root` cannot be reused by `cfg`, or None if it can (then
    the keys that differ but only change how the run executes, like epochs, are logged). A
    config.yaml of an older dcluster lacks the keys added since: they count at their legacy
    values (dcluster/core/config_settings.py)."""
    stored_path = root / "config.yaml"
    if not stored_path.is_file():
        return "is not empty but has no config.yaml, so it holds no run of dcluster's"
    try:
        stored = keys_in_yaml_file(stored_path, type(cfg))
    except Exception as err:  # YAML syntax errors come in several types besides ConfigError
        return f"its config.yaml cannot be read back ({err})"
    changes = setting_changes(stored, hashed_settings(cfg), type(cfg))
    if changes:
        return ("holds a run with a different config (stored -> requested): "
                + describe_changes(changes)
                + ". Pass overwrite=true to move it aside, or choose another name")
    if cfg.resume == "never":
        return ("holds a run with this config, and resume=never. Pass resume=auto to continue "
                "it, or overwrite=true to move it aside and start again")
    for key, value in flatten(cfg).items():
        if key in stored and stored[key] != value:
            log.info("resuming with %s changed: %r -> %r", key, stored[key], value)
    return None


def _move_aside(root: Path, reason: str) -> None:
    """Rename `root` to `<name>.old-<timestamp>[-n]`, keeping every file of the old run."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = root.with_name(f"{root.name}.old-{stamp}")
    suffix = 1
    while target.exists():
        target = root.with_name(f"{root.name}.old-{stamp}-{suffix}")
        suffix += 1
    root.rename(target)
    log.warning("overwrite=true: moved %s aside to %s (it %s)", root, target, reason)


def save_assignments(run_dir: RunDir, epoch: int, labels: np.ndarray) -> Path:
    """Write the cluster labels of `epoch` (one per image, by global index) as a .npy file."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels of epoch {epoch}: expected a 1-D array, got shape {labels.shape}")
    path = run_dir.assignments / f"epoch_{epoch:06d}.npy"
    remove_stale_temps(run_dir.assignments)
    atomic_write(path, lambda f: np.save(f, labels, allow_pickle=False))
    return path


def attach_log_file(run_dir: RunDir) -> logging.Handler:
    """Append the `dcluster` logger's records to train.log, so a batch job's history stays
    with its checkpoints. Idempotent per file. The logger's own level still applies
    (dcluster.core.logs.configure_logging sets INFO)."""
    logger = logging.getLogger("dcluster")
    target = str(run_dir.log_path)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == target:
            return handler
    handler = logging.FileHandler(target, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    return handler
