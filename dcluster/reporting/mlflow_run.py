"""MLflow tracking of one run across all its restarts, from one process (rank 0).

A run directory maps to exactly one MLflow run, whatever kills and requeues it goes through:
the run is created tagged with the directory's uid (so a kill right after its creation still
finds it again) and its id is written to the directory at once (``mlflow_run_id``), so the
curves of a week-long training read as one. The default store is a SQLite file under
runs_root, built whole or not at all (mlflow_store.py): MLflow 3 refuses its old plain-file
store, and SQLite needs no server. SQLite tolerates one writer, hence one process logs; the
others get a NullTracker.

One value per metric per epoch: an epoch's metrics are logged as soon as it ends, before its
checkpoint commits, so a run that resumes from an older checkpoint (a kill before the commit,
a corrupt newest checkpoint) redoes epochs MLflow already holds. On every start the run's
metrics are therefore made to agree with the history of the checkpoint it resumes from: the
values of the epochs it does not hold are removed (they are logged again when those epochs
are redone) and any it holds but MLflow lacks are logged. Removing needs the SQL store (the
default); a tracking server offers no call for it, and there the stale values stay, with a
warning.

MlflowClient is used rather than the fluent ``mlflow.start_run`` API: the fluent API keeps the
active run in global state, which would tie a process (and a test session) to one run.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from dcluster.core.atomic import atomic_write_bytes
from dcluster.core.config import Config, flatten
from dcluster.core.config_settings import config_hash
from dcluster.reporting.mlflow_store import ensure_store, sqlite_path, tracking_uri
from dcluster.core.rundir import RunDir

log = logging.getLogger("dcluster.reporting.tracking")

UID_TAG = "dcluster_run_uid"  # the run directory's uid (RunDir.uid) on its MLflow run
EVAL_PREFIX = "eval_"  # metrics `dcluster eval` logs beside the training's: not the history's


def artifact_location(cfg: Config) -> Optional[str]:
    """With the default store, artifacts go next to it; MLflow's own default is ./mlruns
    relative to the working directory, which moves with every launch."""
    return None if cfg.tracking.uri else (Path(cfg.runs_root) / "mlartifacts").resolve().as_uri()


def open_client(cfg: Config) -> tuple[MlflowClient, str]:
    """A client of the run's store, and its URI; the default SQLite store is created whole
    first if it does not exist yet."""
    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    if db is not None:
        ensure_store(db, artifact_location(cfg) or (db.parent / "mlartifacts").as_uri())
    return MlflowClient(tracking_uri=uri), uri


def experiment_id(client: MlflowClient, cfg: Config, uri: str) -> str:
    """The id of cfg.tracking.experiment, created on first use (by whichever of several runs
    started together gets there first)."""
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    log.info("creating MLflow experiment %r in %s", cfg.tracking.experiment, uri)
    try:
        return client.create_experiment(cfg.tracking.experiment,
                                        artifact_location=artifact_location(cfg))
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def epoch_values(history: Sequence[dict[str, float]]) -> dict[int, dict[str, float]]:
    """What MLflow should hold for a run's history: {step: {metric: value}}, step being the
    epoch's number, finite values only (log_metrics drops the others)."""
    return {int(entry["epoch"]): {key: float(value) for key, value in entry.items()
                                  if key != "epoch" and math.isfinite(value)}
            for entry in history}


def steps_to_redo(logged: dict[str, list[tuple[int, float]]],
                  expected: dict[int, dict[str, float]]) -> tuple[set[int], set[int]]:
    """The steps whose logged values disagree with ``expected``: (those holding a value the
    history does not, to be removed and logged again; those only missing values, to be
    logged). ``logged`` is {metric: [(step, value), ...]} as MLflow holds it."""
    found: dict[int, dict[str, list[float]]] = {}
    for key, points in logged.items():
        for step, value in points:
            found.setdefault(step, {}).setdefault(key, []).append(value)
    wrong, missing = set(), set()
    for step in found.keys() | expected.keys():
        have, want = found.get(step, {}), expected.get(step, {})
        if any(values != [want.get(key)] for key, values in have.items()):
            wrong.add(step)
        elif have.keys() != want.keys():
            missing.add(step)
    return wrong, missing


class Tracker:
    """One MLflow run; `start` creates it or continues the run of a resumed checkpoint."""

    def __init__(self) -> None:
        self._client: MlflowClient | None = None
        self.run_id: str | None = None

    def start(self, cfg: Config, run_dir: RunDir, resume_run_id: str | None = None,
              history: Sequence[dict[str, float]] = ()) -> str:
        """Open the run directory's MLflow run (created on its first start) and record what
        defines it; ``history`` is the resumed checkpoint's, which the run's metrics are made
        to agree with. Returns the run id to store in checkpoints."""
        self._client, uri = open_client(cfg)
        experiment = experiment_id(self._client, cfg, uri)
        known = run_dir.mlflow_run_id() or resume_run_id
        run = ((self._existing_run(known) if known else None)
               or self._tagged_run(experiment, run_dir))
        if run is None:
            run = self._client.create_run(experiment, run_name=cfg.name,
                                          tags={UID_TAG: run_dir.uid()})
            log.info("MLflow run %s started in %s", run.info.run_id, uri)
        else:
            self._client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            log.info("MLflow run %s continued in %s", run.info.run_id, uri)
        self.run_id = run.info.run_id
        if run_dir.mlflow_run_id() != self.run_id:
            atomic_write_bytes(run_dir.mlflow_run_id_path, self.run_id.encode())
        self._log_params(cfg, logged=run.data.params)
        self._client.set_tag(self.run_id, "run_dir", str(run_dir.root))
        self._client.set_tag(self.run_id, "config_hash", config_hash(cfg))
        self._client.log_artifact(self.run_id, str(run_dir.config_path))
        self._agree_with(history, logged_keys=run.data.metrics.keys())
        return self.run_id

    def _existing_run(self, run_id: str) -> Run | None:
        """The run to continue; None (a new run) if the store lost it, since losing the
        tracking history should not stop the training."""
        assert self._client is not None
        try:
            return self._client.get_run(run_id)
        except MlflowException as err:
            log.warning("MLflow run %s of this run directory is not in the store (%s): "
                        "starting a new run", run_id, err)
            return None

    def _tagged_run(self, experiment: str, run_dir: RunDir) -> Run | None:
        """The run created for this directory by a start killed before it wrote the id down."""
        assert self._client is not None
        found = self._client.search_runs([experiment],
                                         filter_string=f"tags.{UID_TAG} = '{run_dir.uid()}'")
        return found[0] if found else None

    def _agree_with(self, history: Sequence[dict[str, float]], logged_keys: Iterable[str]) -> None:
        """Make the run's metrics hold exactly one value per epoch of ``history``; see the
        module doc."""
        assert self._client is not None and self.run_id is not None
        client, run_id = self._client, self.run_id
        expected = epoch_values(history)
        logged = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
                  for key in logged_keys if not key.startswith(EVAL_PREFIX)}
        wrong, missing = steps_to_redo(logged, expected)
        removed = bool(wrong) and remove_metric_steps(client, run_id, wrong, list(logged))
        if removed:
            log.info("MLflow run %s: removed the values of epoch(s) %s, which the run redoes "
                     "from its checkpoint", run_id, sorted(wrong))
        elif wrong:
            log.warning("MLflow run %s holds values of epoch(s) %s that this resume redoes; "
                        "this store cannot remove them, so those epochs show two values",
                        run_id, sorted(wrong))
        present = {(key, step) for key, points in logged.items() for step, _ in points}
        for step in sorted((wrong | missing) & expected.keys()):
            cleared = removed and step in wrong
            self.log_metrics({key: value for key, value in expected[step].items()
                              if cleared or (key, step) not in present}, step)

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
            log.debug("MLflow run %s: %d metric(s) logged at step %d", self.run_id, len(batch),
                      step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        assert self._client is not None and self.run_id is not None, "start() first"
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED (a preempted run: it will continue)."""
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status)


def remove_metric_steps(client: MlflowClient, run_id: str, steps: set[int],
                        keys: list[str]) -> bool:
    """Delete every value of ``keys`` at ``steps`` from a SQL store, in one transaction, and
    recompute MLflow's latest-value table for them; False where the store is not SQL (MLflow
    has no API for this: its own store classes are used)."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = client._tracking_client.store  # pylint: disable=protected-access
    if not isinstance(store, SqlAlchemyStore):
        return False
    with store.ManagedSessionMaker(read_only=False) as session:
        of_run = (SqlMetric.run_uuid == run_id, SqlMetric.key.in_(keys))
        session.query(SqlMetric).filter(*of_run, SqlMetric.step.in_(sorted(steps))).delete(
            synchronize_session=False)
        session.query(SqlLatestMetric).filter(SqlLatestMetric.run_uuid == run_id,
                                              SqlLatestMetric.key.in_(keys)).delete(
            synchronize_session=False)
        for key in keys:
            newest = (session.query(SqlMetric).filter(SqlMetric.run_uuid == run_id,
                                                      SqlMetric.key == key)
                      .order_by(SqlMetric.step.desc(), SqlMetric.timestamp.desc(),
                                SqlMetric.value.desc()).first())
            if newest is not None:
                session.add(SqlLatestMetric(key=key, value=newest.value, step=newest.step,
                                            timestamp=newest.timestamp, is_nan=newest.is_nan,
                                            run_uuid=run_id))
    return True
