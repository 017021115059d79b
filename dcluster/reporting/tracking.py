"""Which tracker a process logs to (the store's address: mlflow_store.tracking_uri).

MLflow records every run (dcluster/reporting/mlflow_run.py) from one process, rank 0: the others, and
runs with tracking off, get a NullTracker. MLflow is imported only where it is used: it adds
about 2 s to the start of every process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, Sequence

from dcluster.core.config import Config
from dcluster.core.rundir import RunDir


class RunTracker(Protocol):
    def start(self, cfg: Config, run_dir: RunDir, resume_run_id: Optional[str] = None,
              history: Sequence[dict[str, float]] = ()) -> Optional[str]: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracking switched off, or a process other than rank 0: every call does nothing."""

    def start(self, cfg: Config, run_dir: RunDir, resume_run_id: str | None = None,
              history: Sequence[dict[str, float]] = ()) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def make_tracker(cfg: Config, is_rank0: bool) -> RunTracker:
    """The tracker for this process: a real one only where tracking is on and rank is 0."""
    if not (cfg.tracking.enabled and is_rank0):
        return NullTracker()
    from dcluster.reporting.mlflow_run import Tracker

    return Tracker()
