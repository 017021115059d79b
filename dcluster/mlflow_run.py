"""MLflow tracking of one run across all its restarts, from one process (rank 0).

A preempted and requeued job continues the SAME MLflow run (its id travels in the checkpoint),
so the curves of a week-long training read as one. The default store is a SQLite file under
runs_root: MLflow 3 refuses its old plain-file store, and SQLite needs no server. SQLite
tolerates one writer, hence one process logs; the others get a NullTracker.

MlflowClient is used rather than the fluent ``mlflow.start_run`` API: the fluent API keeps the
active run in global state, which would tie a process (and a test session) to one run.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from dcluster.config import Config, config_hash, flatten
from dcluster.rundir import RunDir
from dcluster.tracking import tracking_uri

log = logging.getLogger("dcluster.tracking")


def experiment_id(client: MlflowClient, cfg: Config, uri: str) -> str:
    """The id of cfg.tracking.experiment, created on first use."""
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    # With the default store, artifacts go next to it; MLflow's own default is ./mlruns
    # relative to the working directory, which moves with every launch.
    location = None if cfg.tracking.uri else (
        (Path(cfg.runs_root) / "mlartifacts").resolve().as_uri())
    log.info("creating MLflow experiment %r in %s", cfg.tracking.experiment, uri)
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location)


class Tracker:
    """One MLflow run; `start` creates it or continues the run of a resumed checkpoint."""

    def __init__(self) -> None:
        self._client: MlflowClient | None = None
        self.run_id: str | None = None

    def start(self, cfg: Config, run_dir: RunDir, resume_run_id: str | None = None) -> str:
        """Open the run and record what defines it; returns the run id to store in checkpoints."""
        uri = tracking_uri(cfg)
        self._client = client = MlflowClient(tracking_uri=uri)
        run = self._existing_run(resume_run_id) if resume_run_id else None
        if run is None:
            experiment_id = self._experiment_id(cfg, uri)
            run = client.create_run(experiment_id, run_name=cfg.name)
            log.info("MLflow run %s started in %s", run.info.run_id, uri)
        else:
            client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            log.info("MLflow run %s continued in %s", run.info.run_id, uri)
        self.run_id = run.info.run_id
        self._log_params(cfg, logged=run.data.params)
        client.set_tag(self.run_id, "run_dir", str(run_dir.root))
        client.set_tag(self.run_id, "config_hash", config_hash(cfg))
        client.log_artifact(self.run_id, str(run_dir.config_path))
        return self.run_id

    def _existing_run(self, run_id: str) -> Run | None:
        """The run to continue; None (a new run) if the store lost it, since losing the
        tracking history should not stop the training."""
        assert self._client is not None
        try:
            return self._client.get_run(run_id)
        except MlflowException as err:
            log.warning("MLflow run %s from the checkpoint is not in the store (%s): "
                        "starting a new run", run_id, err)
            return None

    def _experiment_id(self, cfg: Config, uri: str) -> str:
        assert self._client is not None
        return experiment_id(self._client, cfg, uri)

    def _log_params(self, cfg: Config, logged: dict[str, str]) -> None:
        """Log the flattened config, skipping params the run already has: MLflow rejects a
        param re-logged with another value, and on a resume execution-only keys (epochs,
        data.path...) may legitimately differ; those differences are logged instead."""
        assert self._client is not None and self.run_id is not None
        params = []
        for key, value in flatten(cfg).items():
            text = str(value)[:MAX_PARAM_VAL_LENGTH]
            if key not in logged:
                params.append(Param(key, text))
            elif logged[key] != text:
                log.info("param %s is %r in MLflow run %s, %r in this session (kept as logged)",
                         key, logged[key], self.run_id, text)
        for first in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id,
                                   params=params[first:first + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log finite values at `step` (the epoch); NaN/inf are dropped with a warning, since
        they would flatten every plot of the metric."""
        assert self._client is not None and self.run_id is not None, "start() first"
        timestamp = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):
                batch.append(Metric(key, value, timestamp, step))
            else:
                log.warning("metric %s = %s at step %d is not finite: not logged", key, value, step)
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        assert self._client is not None and self.run_id is not None, "start() first"
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED (a preempted run: it will continue)."""
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status)
