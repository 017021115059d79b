"""What a run carries from one epoch to the next besides a method's own objects, and the
checkpoint's layout.

A checkpoint is one mapping: the run's own entries (format, what the run is, where it stands,
its history and MLflow run, the RNG streams) and one entry per stateful object, under the
name the method gives it (``model``, ``body_optimizer``, ``targets``...), holding that
object's ``state_dict()``. Writing and restoring go through the same mapping, so there is one
pack and one unpack for every method (the idiom of SwAV's ``restart_from_checkpoint``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np

from dcluster.core.batch import BatchPlan
from dcluster.runtime.checkpoint import CheckpointError, load_shard
from dcluster.core.config_settings import describe_changes, recorded_settings, setting_changes
from dcluster.runtime.optimize import EpochProgress

# 2 added mid-epoch checkpoints; 3 names every object's state; 4 numbers the history's epochs
# from 1, as the log, MLflow and the checkpoint names do; 5 drops the in-epoch "extra" (the
# harness knows which stages an interrupted epoch finished)
FORMAT_VERSION = 5
OLD_FORMATS = (1, 2, 3, 4)  # read through upgraded()


class Stateful(Protocol):
    """What the checkpoint holds of an object: torch's modules and optimisers already are."""

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> Any:
        ...


class ShardedStateful(Stateful, Protocol):
    """An object too large for rank 0 to gather (the feature bank): every rank writes its own
    part to a shard file beside the checkpoint (Checkpointer.write_shards), and the checkpoint
    holds ``state_dict()`` with the list of those files under "shards"."""

    def shard_state(self) -> dict[str, Any]:
        """This rank's part, for its shard file."""
        ...

    def load_shards(self, state: dict[str, Any], read: Callable[[int], dict[str, Any]]) -> None:
        """Restore from the checkpoint's ``state``; ``read(r)`` loads the part rank r wrote."""
        ...


def sharded_objects(objects: dict[str, Stateful]) -> dict[str, ShardedStateful]:
    return {name: obj for name, obj in objects.items() if hasattr(obj, "shard_state")}


@dataclass
class Clusters:
    """The cluster of every image (by global index; -1 unreadable): DeepCluster's
    pseudo-labels, MMDC's nearest mixture components. What the epoch report scores and the
    run directory's assignments/ files hold."""
    labels: Optional[np.ndarray] = None  # int64 (N,)
    previous_labels: Optional[np.ndarray] = None
    n_clusters: int = 0
    updated_epoch: int = -1  # the epoch that made ``labels``

    def update(self, labels: np.ndarray, n_clusters: int, epoch: int) -> None:
        self.previous_labels, self.labels = self.labels, labels
        self.n_clusters, self.updated_epoch = n_clusters, epoch

    def sizes(self) -> np.ndarray:
        assert self.labels is not None
        return np.bincount(self.labels[self.labels >= 0], minlength=self.n_clusters)

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "previous_labels": self.previous_labels,
                "n_clusters": self.n_clusters, "updated_epoch": self.updated_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labels, self.previous_labels = state["labels"], state["previous_labels"]
        self.n_clusters, self.updated_epoch = state["n_clusters"], state["updated_epoch"]


@dataclass
class InterruptedEpoch:
    """An epoch checkpointed part way through its training passes (on a stop signal, or
    periodically), so that a resume continues it: nothing computed again, no image trained
    on twice or skipped. The checkpoint's ``iteration`` says where: 1 + ``offset`` + the
    iterations of the pass under way (max over ranks). The harness (harness.EpochRunner)
    writes it and resumes from it: the stages before pass ``stage`` are done."""
    stage: int  # the pass under way, by index among the epoch's passes (stages.Pass)
    offset: int  # iterations of the epoch's finished passes
    metrics: dict[str, float]  # what the epoch has measured so far, for its report
    ranks: list[dict[str, Any]]  # per rank: "progress" (EpochProgress), "rng", "buffers"

    def progress(self, rank: int) -> EpochProgress:
        return EpochProgress(**self.ranks[rank]["progress"])


@dataclass
class RunProgress:
    """The harness's own part of the run state."""
    next_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    bad_images: dict[int, str] = field(default_factory=dict)  # global index -> reason
    mlflow_run_id: Optional[str] = None
    in_epoch: Optional[InterruptedEpoch] = None  # set: epoch `next_epoch` is under way


def upgraded(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of an older format in today's layout."""
    old = payload.get("format")
    if old not in OLD_FORMATS:
        return payload
    new = _named_objects(payload) if old in (1, 2) else dict(payload)
    if old in (1, 2, 3):
        new["history"] = [dict(entry, epoch=entry["epoch"] + 1) for entry in new["history"]]
    if new.get("in_epoch"):  # formats 3 and 4 kept the method's "extra" facts
        new["in_epoch"] = {key: value for key, value in new["in_epoch"].items()
                           if key != "extra"}
    new["format"] = FORMAT_VERSION
    return new


def _named_objects(payload: dict[str, Any]) -> dict[str, Any]:
    """Formats 1 and 2 kept the labels and the optimisers' states as top-level entries."""
    new = dict(payload)
    in_epoch = new.get("in_epoch")
    new["clusters"] = {"labels": new.pop("labels"), "previous_labels": new.pop("previous_labels"),
                       "n_clusters": new.pop("n_clusters"),
                       "updated_epoch": new["epoch"] if in_epoch and in_epoch["reclustered"]
                       else new["epoch"] - 1}
    if "head_optimizer" in new:
        new["head"] = {"n_clusters": new["clusters"]["n_clusters"],
                       "optimizer": new.pop("head_optimizer")}
    if "assignment" in new:
        new["targets"] = {"assignment": new.pop("assignment"), "refined": new.pop("refined")}
    if in_epoch:
        new["in_epoch"] = {"stage": 0, "offset": 0, "metrics": in_epoch["metrics"],
                           "ranks": [dict(rank, buffers=None) for rank in in_epoch["ranks"]]}
    return new


def check_compatible(payload: dict[str, Any], settings: dict[str, Any], data_fingerprint: str,
                     source: str, schema: type) -> None:
    """Refuse a checkpoint of another format, of other settings (a hashed key changed: the
    keys a checkpoint of an older dcluster lacks are read at their legacy values, see
    config_settings.py; ``schema`` declares them) or of another file list (named by `source`)."""
    if payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{source}: checkpoint format {payload.get('format')!r}, "
                              f"this dcluster reads formats {(*OLD_FORMATS, FORMAT_VERSION)}")
    # a checkpoint lives in <run directory>/checkpoints/, beside the run's config.yaml
    recorded = recorded_settings(payload, settings, Path(source).parent.parent / "config.yaml",
                                 schema)
    if recorded is None:
        raise CheckpointError(f"{source}: written by an older dcluster under another config "
                              f"(hash {payload['config_hash']}; neither this config nor its "
                              "run's config.yaml gives it); resume with the run's own "
                              "config.yaml")
    changes = setting_changes(recorded, settings, schema)
    if changes:
        raise CheckpointError(f"{source}: written under another config (checkpoint -> now): "
                              f"{describe_changes(changes)}")
    if payload["data_fingerprint"] != data_fingerprint:
        raise CheckpointError(f"{source}: the image folder's file list changed since this "
                              "checkpoint was written, so global indices (and the saved "
                              "pseudo-labels) no longer name the same images; restore the "
                              "folder or start a new run")


def check_global_batch(payload: dict[str, Any], batch: BatchPlan, source: str) -> None:
    """Refuse to go on at another global batch than the checkpoint trained with: a per-process
    optim.batch_size resumed on another number of processes would change it silently. A
    checkpoint older than the record carries none, and is not checked."""
    trained = payload.get("global_batch")
    if trained is None or trained == batch.global_batch:
        return
    raise CheckpointError(f"{source}: trained at a global batch of {trained}, this job's would "
                          f"be {batch.describe()}: pass optim.global_batch={trained} (a multiple "
                          f"of the number of processes) to keep it")


def restore_objects(payload: dict[str, Any], objects: dict[str, Stateful], source: Path) -> None:
    """Load every named object's state, in the mapping's order (a method lists first what
    shapes the others: DeepCluster's head before the model that holds it); a sharded
    object's parts from the shard files beside the checkpoint ``source``."""
    missing = [name for name in objects if name not in payload]
    if missing:
        raise CheckpointError(f"{source}: holds no {', '.join(missing)} (a checkpoint of "
                              "another method, or of another clustering.features?)")
    sharded = sharded_objects(objects)
    for name, obj in objects.items():
        if name in sharded:
            files = payload[name]["shards"]
            sharded[name].load_shards(payload[name], lambda rank, files=files: load_shard(
                source.parent, files[rank]))
        else:
            obj.load_state_dict(payload[name])
