"""Where an evaluation's numbers go: a small table on stdout, a JSON file, and MLflow.

In MLflow the result is a run nested under the training run (tag mlflow.parentRunId), with
the protocol's settings as params, its scores as metrics and the JSON as an artifact; the
scores are also logged on the training run itself as eval_<protocol>_<metric> at the
checkpoint's epoch, so they plot beside the training curves. An untrained network's result is
a top-level run of the experiment, tagged dcluster.eval_target=random-init.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from dcluster.core.atomic import atomic_write_bytes
from dcluster.evaluation.target import EvalTarget
from dcluster.reporting.mlflow_run import experiment_id, open_client

log = logging.getLogger("dcluster.eval")


@dataclass
class EvalResult:
    name: str  # protocol, with the layer for the linear probe: knn, clusters, linear_conv5
    target: EvalTarget
    metrics: dict[str, float]
    settings: dict[str, Any]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        t = self.target
        return {"protocol": self.name, "target": t.describe(),
                "checkpoint": str(t.checkpoint) if t.checkpoint else None,
                "run_dir": str(t.run_dir) if t.run_dir else None, "epoch": t.epoch,
                "method": t.cfg.method, "arch": t.cfg.model.arch, "data_path": t.cfg.data.path,
                "settings": self.settings, "metrics": self.metrics,
                "seconds": round(self.seconds, 2)}


def format_table(result: EvalResult) -> str:
    width = max(len(key) for key in [*result.metrics, "metric"])
    lines = [f"eval {result.name}: {result.target.describe()}", f"{'metric':<{width}}  value"]
    lines += [f"{key:<{width}}  {value:.4f}" for key, value in result.metrics.items()]
    lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in result.settings.items()))
    return "\n".join(lines)


def write_json(result: EvalResult, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(result.as_dict(), indent=2) + "\n").encode())
    return path


def log_to_mlflow(result: EvalResult, json_path: Path) -> Optional[str]:
    """The id of the MLflow run that holds the result; None when tracking is off."""
    cfg, target = result.target.cfg, result.target
    if not cfg.tracking.enabled:
        return None
    client, uri = open_client(cfg)
    tags = {"dcluster.eval": result.name,
            "dcluster.eval_target": str(target.checkpoint) if target.checkpoint else "random-init"}
    parent = _parent_experiment(client, target.mlflow_run_id)
    if parent is not None:
        tags["mlflow.parentRunId"] = target.mlflow_run_id
    experiment = parent or experiment_id(client, cfg, uri)
    run = client.create_run(experiment, run_name=f"eval-{result.name}-e{target.epoch}", tags=tags)
    now = int(time.time() * 1000)
    metrics = {k: v for k, v in result.metrics.items() if math.isfinite(v)}
    client.log_batch(run.info.run_id,
                     metrics=[Metric(k, v, now, target.epoch) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in result.settings.items()])
    client.log_artifact(run.info.run_id, str(json_path))
    client.set_terminated(run.info.run_id)
    if parent is not None:
        client.log_batch(target.mlflow_run_id, metrics=[
            Metric(f"eval_{result.name}_{k}", v, now, target.epoch) for k, v in metrics.items()])
    log.info("MLflow: eval run %s in %s%s", run.info.run_id, uri,
             f", nested under {target.mlflow_run_id}" if parent else "")
    return run.info.run_id


def _parent_experiment(client: MlflowClient, run_id: Optional[str]) -> Optional[str]:
    """The experiment of the training run, or None when there is none (or the store lost it:
    the result is still recorded, as a run of its own)."""
    if run_id is None:
        return None
    try:
        return client.get_run(run_id).info.experiment_id
    except MlflowException as err:
        log.warning("training run %s is not in the MLflow store (%s): recording the evaluation "
                    "as a run of its own", run_id, err)
        return None
