"""Checkpoints that survive a kill at any instant, and the RNG states a resume needs.

A preempted job can die between any two system calls, so a checkpoint is written atomically
(dcluster.core.atomic: a temp file, fsynced and renamed), and only then does a sidecar with its
sha256 appear, written the same way. The sidecar is the commit marker: a data file without one
(or whose bytes no longer match it) is skipped on resume, and the previous checkpoint is used.
Old checkpoints are pruned only after the new one is committed.

One writer per directory is assumed (rank 0): temp files found at the start of a save can only
come from a killed writer and are removed.

State too large for one rank to gather (the feature bank: every rank holds a slice) goes into
shard files beside the checkpoint, ``<checkpoint name>.shard-<what>-r<rank>``, one per rank,
each written atomically by its own rank before rank 0 commits the checkpoint. The checkpoint
lists them (``shard_files``: name, size, sha256), so it is committed only once every shard is
complete; a resume skips a checkpoint whose shards are missing or truncated, and a shard's
hash is checked by the rank that reads it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcluster.core.atomic import (atomic_write, atomic_write_bytes, publish, remove_stale_temps,
                             temp_path)
from dcluster.core.errors import UserError

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
BEST_NAME = "best.pt"  # checkpoint.keep_best's copy; outside _NAME, so resume never picks it
SUPERSEDED_SUFFIX = ".superseded"
SHARD_INFIX = ".shard-"
SHARD_FILES = "shard_files"  # the checkpoint's list of its shard files
_NAME = re.compile(r"^ckpt_e(\d+)_i(\d+)\.pt$")


class CheckpointError(RuntimeError, UserError):
    """A checkpoint file that is incomplete, corrupt or unreadable; the message names it."""


def checkpoint_name(epoch: int, iteration: int) -> str:
    """Zero-padded so that a directory listing sorts like (epoch, iteration)."""
    return f"ckpt_e{epoch:06d}_i{iteration:07d}.pt"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def shard_path(checkpoint: Path, what: str, rank: int) -> Path:
    """Where rank ``rank`` writes its part of ``what`` for ``checkpoint``."""
    return checkpoint.with_name(f"{checkpoint.name}{SHARD_INFIX}{what}-r{rank:05d}")


def _shards_of(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + SHARD_INFIX + "*"))


def save_shard(path: Path, state: Any) -> dict[str, Any]:
    """Write one rank's shard atomically; what the checkpoint records of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def load_shard(directory: Path, described: dict[str, Any]) -> Any:
    """A shard file a checkpoint in ``directory`` lists, after checking its hash."""
    path = Path(directory) / described["file"]
    _check_shard_size(path, described)
    actual = _sha256(path)
    if actual != described["sha256"]:
        raise CheckpointError(f"checkpoint shard {path}: corrupt, sha256 {actual} does not "
                              f"match {described['sha256']} recorded in its checkpoint; resume "
                              "from the previous checkpoint (resume=<its path>)")
    return torch.load(path, map_location="cpu", weights_only=False)


def _check_shard_size(path: Path, described: dict[str, Any]) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint shard {path}: no such file")
    if path.stat().st_size != described["bytes"]:
        raise CheckpointError(f"checkpoint shard {path}: {path.stat().st_size} bytes, its "
                              f"checkpoint recorded {described['bytes']} (truncated?)")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checkpoints(directory: Path) -> list[tuple[tuple[int, int], Path]]:
    """Data files (complete or not), oldest first, ordered by the numbers, not the text."""
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append(((int(match[1]), int(match[2])), path))
    return sorted(found)


def save_checkpoint(directory: Path, state: dict[str, Any], epoch: int, iteration: int = 0,
                    keep_last: int = 3) -> Path:
    """Commit `state` as checkpoint (epoch, iteration), then prune to `keep_last` complete ones.

    Convention: `epoch` is the epoch in progress and `iteration` the batches done in it, so an
    end-of-epoch checkpoint is (epoch + 1, 0) and sorts after every mid-epoch one.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last = {keep_last}: must be at least 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory)
    path = directory / checkpoint_name(epoch, iteration)
    # Drop the old marker first: while the data is replaced, the old hash would describe
    # bytes that are gone, and a kill there should read as "incomplete", not "corrupt".
    _sidecar(path).unlink(missing_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))
    digest = _sha256(path)
    atomic_write_bytes(_sidecar(path), f"{digest}  {path.name}\n".encode())
    _set_aside_newer(directory, (epoch, iteration))
    _prune(directory, keep_last)
    log.debug("saved checkpoint %s", path)
    return path


def _set_aside_newer(directory: Path, key: tuple[int, int]) -> None:
    """Rename checkpoints that sort after the one just written (left by a timeline abandoned
    by resuming from an older checkpoint), so that the next resume does not jump back to
    them; renamed, not deleted, because they may still be wanted."""
    for other_key, path in _checkpoints(directory):
        if other_key > key:
            log.warning("%s is newer than the checkpoint just written (resumed from an older "
                        "one?): renaming it to %s", path, path.name + SUPERSEDED_SUFFIX)
            for companion in (_sidecar(path), *_shards_of(path)):
                if companion.exists():
                    companion.rename(companion.with_name(companion.name + SUPERSEDED_SUFFIX))
            path.rename(path.with_name(path.name + SUPERSEDED_SUFFIX))


def _prune(directory: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` committed checkpoints, and uncommitted data files
    older than those. The sidecar goes first so a kill mid-prune leaves an incomplete file,
    never a marker for missing data. Hashes are not re-read here (that would read every kept
    checkpoint on each save); load_latest verifies them."""
    entries = _checkpoints(directory)
    committed = [key for key, path in entries if _sidecar(path).exists()]
    oldest_kept = committed[-keep_last:][0]
    for key, path in entries:
        if key < oldest_kept:
            _sidecar(path).unlink(missing_ok=True)
            path.unlink()
            for shard in _shards_of(path):
                shard.unlink()
            log.debug("pruned checkpoint %s", path)
    for sidecar in directory.glob(f"*.pt{SIDECAR_SUFFIX}"):
        if not sidecar.with_suffix("").exists():
            sidecar.unlink()
    # shards whose checkpoint was never committed (a kill between the two) or is gone
    for shard in directory.glob(f"ckpt_*.pt{SHARD_INFIX}*"):
        if (not shard.name.endswith(SUPERSEDED_SUFFIX)
                and not shard.with_name(shard.name.split(SHARD_INFIX)[0]).exists()):
            shard.unlink()


def keep_as_best(path: Path) -> Path:
    """Make the committed checkpoint ``path`` also ``best.pt`` in its directory (with its
    sidecar), so that pruning ``path`` later leaves it: a hard link where the file system
    has them (no second copy of the bytes), else a copy. Ordered as save_checkpoint is:
    marker off, data replaced atomically, marker on, so a kill leaves an incomplete best.pt,
    never one whose marker describes other bytes."""
    path = Path(path)
    best = path.with_name(BEST_NAME)
    remove_stale_temps(path.parent, BEST_NAME)
    _sidecar(best).unlink(missing_ok=True)
    tmp = temp_path(best)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    publish(tmp, best)
    atomic_write_bytes(_sidecar(best), f"{_sha256(best)}  {BEST_NAME}\n".encode())
    log.info("%s is the best checkpoint so far: kept as %s", path.name, best)
    return best


def load_checkpoint(path: Path, with_shards: bool = False) -> dict[str, Any]:
    """Load one checkpoint after checking its commit marker and hash; CheckpointError if not.
    ``with_shards`` (a resume): its shard files must be there too, at their recorded sizes
    (an evaluation reads the model alone, from best.pt say, whose shards may be pruned)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint {path}: incomplete, its checksum file {sidecar.name} "
                              "is missing (the writer was interrupted, or it was copied alone)")
    tokens = sidecar.read_text().split()  # "<hex>  <name>", the format of sha256sum
    expected = tokens[0] if tokens else ""
    actual = _sha256(path)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path}: corrupt, sha256 {actual} does not match "
                              f"{expected or '(empty)'} in {sidecar.name}")
    try:
        # weights_only=False: the state holds numpy arrays (assignments, the numpy RNG state)
        # and Python tuples (the `random` state) that the weights-only unpickler rejects. The
        # hash above only guards against damage, so load checkpoints you wrote yourself.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for unreadable archives
        raise CheckpointError(f"checkpoint {path}: unreadable by torch.load: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(state).__name__}, not a dict")
    for described in state.get(SHARD_FILES, ()) if with_shards else ():
        _check_shard_size(path.parent / described["file"], described)  # hashes: by readers
    return state


def load_latest(directory: Path, with_shards: bool = False) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint in `directory` that verifies and loads, with its path; None if
    there is none. Each one skipped is logged with the reason, so a silent fallback to an
    older epoch cannot go unnoticed."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for _, path in reversed(_checkpoints(directory)):
        try:
            return load_checkpoint(path, with_shards), path
        except CheckpointError as err:
            log.warning("skipping %s; trying the previous checkpoint", err)
    return None


def capture_rng_state() -> dict[str, Any]:
    """Every generator a resumed run draws from, so that it continues the same streams."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state. CUDA states are restored for the devices present; a run
    resumed on fewer (or no) GPUs continues with fresh streams there, which is logged."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda", [])
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != devices:
        log.warning("checkpoint has CUDA RNG states for %d device(s), this process sees %d: "
                    "restoring the first %d", len(cuda_states), devices,
                    min(len(cuda_states), devices))
    for index, cuda_state in enumerate(cuda_states[:devices]):
        torch.cuda.set_rng_state(cuda_state, index)
