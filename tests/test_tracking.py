"""MLflow tracking against a real SQLite store, and the plots it logs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from dcluster.methods import Config
from dcluster.core.config_settings import config_hash
from dcluster.reporting.plots import plot_cluster_sizes, plot_nmi_curves
from dcluster.core.rundir import prepare_run_dir
from dcluster.reporting.mlflow_run import Tracker, steps_to_redo
from dcluster.reporting.mlflow_store import tracking_uri
from dcluster.reporting.tracking import NullTracker, make_tracker

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
    history = [{"epoch": 0.0, "loss": 2.0, "nmi_prev": math.nan},
               {"epoch": 1.0, "loss": 1.5, "nmi_prev": 0.4}]
    assert second.start(cfg, prepare_run_dir(cfg), resume_run_id=run_id, history=history) == run_id
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


def test_steps_to_redo_finds_values_the_history_does_not_hold() -> None:
    expected = {1: {"loss": 2.0, "time": 5.0}, 2: {"loss": 1.5, "time": 4.0}}
    logged = {"loss": [(1, 2.0), (2, 1.5), (2, 1.5), (3, 1.2)],  # 2 twice, 3 not in history
              "time": [(1, 5.0), (2, 4.5)]}  # epoch 2 redone: another time
    assert steps_to_redo(logged, expected) == ({2, 3}, set())
    assert steps_to_redo({"loss": [(1, 2.0)], "time": [(1, 5.0)]}, expected) == (set(), {2})
    assert steps_to_redo({"loss": [(1, 2.0)]}, expected) == (set(), {1, 2})
    assert steps_to_redo({k: [(s, v[k]) for s, v in expected.items()] for k in ("loss", "time")},
                         expected) == (set(), set())


def test_a_resume_that_goes_back_leaves_one_value_per_epoch_that_of_its_history(
        runs_root: Path) -> None:
    """A kill after epoch 3's metrics were logged but before its checkpoint committed (or a
    corrupt newest checkpoint): the run resumes with the history of epochs 1-2, and MLflow
    must hold exactly those values until epoch 3 is logged again."""
    cfg = _cfg(runs_root, "goes_back")
    first = Tracker()
    run_id = first.start(cfg, prepare_run_dir(cfg))
    for step, loss in ((1, 2.0), (2, 1.5), (3, 1.2)):
        first.log_metrics({"loss": loss, "time_training": 10.0 + step}, step)
    first.log_metrics({"loss": 1.5, "time_training": 12.0}, 2)  # a redone epoch, twice logged
    first.finish("KILLED")
    # what dcluster eval logs beside the training's metrics is not the history's to decide
    MlflowClient(tracking_uri=tracking_uri(cfg)).log_metric(run_id, "eval_knn_top1", 0.5, step=3)

    history = [{"epoch": 1.0, "loss": 2.0, "time_training": 11.0},
               {"epoch": 2.0, "loss": 1.5, "time_training": 12.5}]
    second = Tracker()
    assert second.start(cfg, prepare_run_dir(cfg), history=history) == run_id
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    points = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
              for key in ("loss", "time_training", "eval_knn_top1")}
    assert sorted(points["loss"]) == [(1, 2.0), (2, 1.5)]
    assert sorted(points["time_training"]) == [(1, 11.0), (2, 12.5)]
    assert points["eval_knn_top1"] == [(3, 0.5)]
    assert client.get_run(run_id).data.metrics["loss"] == 1.5  # the latest value, recomputed
    second.log_metrics({"loss": 1.1, "time_training": 13.0}, 3)
    second.finish()
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3]
    assert client.get_run(run_id).data.metrics["loss"] == 1.1


def test_a_start_killed_before_it_wrote_the_run_id_finds_its_run_again(runs_root: Path) -> None:
    cfg = _cfg(runs_root, "orphan")
    run_dir = prepare_run_dir(cfg)
    run_id = Tracker().start(cfg, run_dir)
    assert run_dir.mlflow_run_id() == run_id
    run_dir.mlflow_run_id_path.unlink()  # as if killed right after MLflow created the run
    assert Tracker().start(cfg, prepare_run_dir(cfg)) == run_id
    assert run_dir.mlflow_run_id() == run_id

    cfg.seed = 1  # another run under the same name: the old directory is moved aside
    cfg.overwrite = True
    fresh = prepare_run_dir(cfg)
    assert fresh.root == run_dir.root and Tracker().start(cfg, fresh) != run_id
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    named = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string="attributes.run_name = 'orphan'")
    assert len(named) == 2
