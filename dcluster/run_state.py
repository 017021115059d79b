"""Everything a run carries from one epoch to the next, and its round trip through a
checkpoint. Restoring all of it (RNG states included) is what makes a resumed run end with
the same weights as an uninterrupted one."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

import numpy as np
import torch

from dcluster.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, load_latest,
                                 restore_rng_state)
from dcluster.config import Config
from dcluster.models import DeepClusterNet
from dcluster.rundir import RunDir

FORMAT_VERSION = 2  # 2 added mid-epoch checkpoints ("in_epoch")
READABLE_FORMATS = (1, 2)


@dataclass
class InterruptedEpoch:
    """An epoch checkpointed part way through its training pass (on a stop signal, or
    periodically), so that a resume continues it: no second clustering, no image trained on
    twice or skipped."""
    step: int  # its checkpoint's place in the epoch: 1 once clustered, 1 + k after k iterations
    metrics: dict[str, float]  # what the epoch had measured (clustering, times) for its report
    reclustered: bool  # whether the epoch made new pseudo-labels (for the report)
    ranks: list[dict[str, Any]]  # per rank: "progress" (EpochProgress fields), "rng" (its streams)


@dataclass
class RunState:
    next_epoch: int = 0
    labels: Optional[np.ndarray] = None  # int64 (N,), -1 for unreadable images
    previous_labels: Optional[np.ndarray] = None
    n_clusters: int = 0
    bad_images: dict[int, str] = field(default_factory=dict)  # global index -> reason
    history: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: Optional[str] = None
    in_epoch: Optional[InterruptedEpoch] = None  # set: epoch `next_epoch` is under way


def record(state: RunState, config_hash: str, data_fingerprint: str) -> dict[str, Any]:
    """The checkpoint entries every method writes: what the run is, where it stands, and the
    RNG streams (captured last, by the caller's pack, after everything else is decided)."""
    return {
        "format": FORMAT_VERSION,
        "config_hash": config_hash,
        "data_fingerprint": data_fingerprint,
        "epoch": state.next_epoch,
        "iteration": state.in_epoch.step if state.in_epoch else 0,
        "in_epoch": asdict(state.in_epoch) if state.in_epoch else None,
        "labels": state.labels,
        "previous_labels": state.previous_labels,
        "n_clusters": state.n_clusters,
        "bad_images": dict(state.bad_images),
        "history": list(state.history),
        "mlflow_run_id": state.mlflow_run_id,
    }


State = TypeVar("State", bound=RunState)


def restored(payload: dict[str, Any], cls: type[State], **extra: Any) -> State:
    """The inverse of :func:`record`: a ``cls`` state from the payload's common entries, plus
    ``extra`` fields of a method's own state class."""
    return cls(next_epoch=payload["epoch"], labels=payload["labels"],
               previous_labels=payload["previous_labels"], n_clusters=payload["n_clusters"],
               bad_images=dict(payload["bad_images"]), history=list(payload["history"]),
               mlflow_run_id=payload["mlflow_run_id"],
               in_epoch=InterruptedEpoch(**payload["in_epoch"]) if payload.get("in_epoch") else None,
               **extra)


def pack(state: RunState, model: DeepClusterNet, body_opt: torch.optim.Optimizer,
         head_opt: Optional[torch.optim.Optimizer], config_hash: str,
         data_fingerprint: str) -> dict[str, Any]:
    return {
        **record(state, config_hash, data_fingerprint),
        "model": model.state_dict(),
        "body_optimizer": body_opt.state_dict(),
        "head_optimizer": head_opt.state_dict() if head_opt is not None else None,
        "rng": capture_rng_state(),
    }


def unpack(payload: dict[str, Any], model: DeepClusterNet, body_opt: torch.optim.Optimizer,
           make_head_opt, config_hash: str, data_fingerprint: str,
           source: str) -> tuple[RunState, Optional[torch.optim.Optimizer]]:
    """Restore model, optimisers and RNG from `payload`; `make_head_opt(head)` builds the head's
    optimiser so its state can be loaded into it."""
    check_compatible(payload, config_hash, data_fingerprint, source)
    head_opt = None
    if payload["n_clusters"]:
        head = model.reset_head(payload["n_clusters"], torch.Generator().manual_seed(0))
        head_opt = make_head_opt(head)
    model.load_state_dict(payload["model"])
    body_opt.load_state_dict(payload["body_optimizer"])
    if head_opt is not None and payload["head_optimizer"] is not None:
        head_opt.load_state_dict(payload["head_optimizer"])
    restore_rng_state(payload["rng"])
    return restored(payload, RunState), head_opt


def continue_streams(state: RunState, rank: int, world_size: int, source: str) -> None:
    """Give this rank back the RNG streams it had when an interrupted epoch was saved (its
    dropout masks go on where they stopped). Only with as many ranks as wrote it: each rank's
    position is in its own slice of the epoch's order, and the slices depend on their number."""
    if state.in_epoch is None:
        return
    saved = len(state.in_epoch.ranks)
    if saved != world_size:
        raise CheckpointError(
            f"{source}: saved in the middle of epoch {state.next_epoch} by {saved} rank(s), "
            f"this run has {world_size}: resume it with {saved}, or pass resume=<an "
            "epoch-boundary checkpoint (ckpt_e*_i0000000.pt)> to redo that epoch")
    restore_rng_state(state.in_epoch.ranks[rank]["rng"])


def check_compatible(payload: dict[str, Any], config_hash: str, data_fingerprint: str,
                     source: str) -> None:
    """Refuse a checkpoint of another format, config or file list (named by `source`)."""
    if payload.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{source}: checkpoint format {payload.get('format')!r}, "
                              f"this dcluster reads formats {READABLE_FORMATS}")
    if payload["config_hash"] != config_hash:
        raise CheckpointError(f"{source}: written under another config (hash {payload['config_hash']}, "
                         f"now {config_hash}); resume with the run's own config.yaml")
    if payload["data_fingerprint"] != data_fingerprint:
        raise CheckpointError(f"{source}: the image folder's file list changed since this checkpoint "
                         "was written, so global indices (and the saved pseudo-labels) no "
                         "longer name the same images; restore the folder or start a new run")


def find_resume_checkpoint(cfg: Config, run: RunDir) -> Optional[tuple[dict[str, Any], Path]]:
    """The checkpoint a run continues from, with its path: None for resume=never or when none
    is saved yet (resume=auto), else the newest valid one (auto) or the named one."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return load_latest(run.checkpoints)
    path = Path(cfg.resume)
    return load_checkpoint(path), path
