"""MLflow tracking against a real SQLite store, and the plots it logs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from dcluster.config import Config, config_hash
from dcluster.plots import plot_cluster_sizes, plot_nmi_curves
from dcluster.rundir import prepare_run_dir
from dcluster.mlflow_run import Tracker
from dcluster.tracking import NullTracker, make_tracker, tracking_uri

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the module: creating the SQLite schema takes seconds."""
    return tmp_path_factory.mktemp("runs")


def _cfg(runs_root: Path, name: str) -> Config:
    cfg = Config(name=name, runs_root=str(runs_root))
    cfg.data.path = str(runs_root)
    return cfg


def test_a_resumed_session_continues_the_same_run(runs_root: Path) -> None:
    cfg = _cfg(runs_root, "resume")
    run_dir = prepare_run_dir(cfg)
    first = Tracker()
    run_id = first.start(cfg, run_dir)
    first.log_metrics({"loss": 2.0, "nmi_prev": math.nan}, step=0)
    first.log_metrics({"loss": 1.5, "nmi_prev": 0.4}, step=1)
    first.finish("KILLED")

    cfg.epochs = 1000  # an execution-only change: the logged param stays, no error
    second = Tracker()
    assert second.start(cfg, prepare_run_dir(cfg), resume_run_id=run_id) == run_id
    second.log_metrics({"loss": 1.0, "nmi_prev": 0.6}, step=2)
    plot = plot_cluster_sizes(np.array([0, 3, 5, 90]), run_dir.plots / "sizes.png")
    second.log_artifact(plot, "plots")
    second.finish()

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2]
    assert [m.value for m in client.get_metric_history(run_id, "nmi_prev")] == [0.4, 0.6]
    assert run.data.params["clustering.k"] == "10000"
    assert run.data.params["epochs"] == "500"
    assert run.data.tags["config_hash"] == config_hash(cfg)
    assert run.data.tags["run_dir"] == str(run_dir.root)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/sizes.png"]
    assert str(runs_root.resolve() / "mlartifacts") in run.info.artifact_uri


def test_an_unknown_resume_id_starts_a_new_run(runs_root: Path) -> None:
    cfg = _cfg(runs_root, "lost")
    tracker = Tracker()
    run_id = tracker.start(cfg, prepare_run_dir(cfg), resume_run_id="0" * 32)
    tracker.finish()
    assert run_id != "0" * 32
    assert MlflowClient(tracking_uri=tracking_uri(cfg)).get_run(run_id).info.run_name == "lost"


def test_disabled_or_non_zero_rank_gets_a_null_tracker(runs_root: Path) -> None:
    cfg = _cfg(runs_root, "null")
    assert isinstance(make_tracker(cfg, is_rank0=False), NullTracker)
    cfg.tracking.enabled = False
    assert isinstance(make_tracker(cfg, is_rank0=True), NullTracker)
    assert tracking_uri(cfg) == f"sqlite:///{runs_root.resolve() / 'mlflow.db'}"


def test_plots_are_png_files(tmp_path: Path) -> None:
    history = [{"epoch": 0, "loss": 4.0, "nmi_prev": None, "nmi_classes": 0.1},
               {"epoch": 1, "loss": 3.0, "nmi_prev": 0.3, "nmi_classes": 0.2},
               {"epoch": 2, "loss": 2.5, "nmi_prev": 0.5}]
    for path in (plot_nmi_curves(history, tmp_path / "nmi.png"),
                 plot_cluster_sizes(np.random.default_rng(0).integers(0, 50, 100),
                                    tmp_path / "sub" / "sizes.png", epoch=3)):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
