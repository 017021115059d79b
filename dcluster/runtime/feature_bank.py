"""The feature bank: the features the training forward already computed, so that an epoch
needs no second pass over the data to cluster them. DeepCluster's
``clustering.features=training_pass`` keeps one (the paper's extra pass takes about a third
of an epoch), and DeepCluster-v2 one per view it clusters (its memory bank).

Rows are sharded across ranks by global index, exactly as the extra pass shards its images
(contiguous ranges, distributed.shard_bounds), so the clustering stage reads the bank as it
reads the extra pass's output. The rank that trains on an image is another matter: the
balanced order deals images to ranks without regard to their index. So each rank keeps the
rows it computes in an outbox, and :meth:`FeatureBank.flush` (at the end of the training
pass, and before a mid-epoch checkpoint) sends each row once to the rank that owns it.

Every row carries a stamp saying when it was computed: ``epoch * STAMP_EPOCH`` for a row the
refresh pass (centre crop, eval mode) computed at the start of ``epoch``, and
``epoch * STAMP_EPOCH + 1 + iteration * world_size + rank`` for one a training step computed.
Rows are taken in oldest first, whichever rank sent them and in whatever order they arrive:
each replaces the row held, or with ``clustering.bank.momentum`` m blends into it (an average
over an image's last draws, which damps the noise of a single augmented crop). A resumed epoch
stamps its rows as the uninterrupted one would, so it ends with the same bank. Before a clustering, the rows older than ``clustering.bank.max_age`` epochs (and those
never computed: the first epoch's whole bank) are recomputed by the refresh pass, so every
clustered row is at most that old.

The bank is part of the run state: each rank writes its rows to its own shard file beside the
checkpoint (checkpoint.py), none gathered to one rank, and a resume with another number of
ranks reads the overlapping parts of the old shards.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from dcluster.runtime.checkpoint import CheckpointError
from dcluster.parallel.collectives import Comm
from dcluster.core.config import BankConfig
from dcluster.parallel.distributed import shard_bounds
from dcluster.runtime.extract import ShardFeatures
from dcluster.parallel.memory_plan import plan
from dcluster.parallel.pinned import PinnedBuffer

log = logging.getLogger(__name__)

STAMP_EPOCH = 1 << 40
"""Stamps per epoch: more than any epoch's iterations times ranks (plus the refresh's one)."""
NEVER = -1  # the stamp of a row nothing has computed yet

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def stamp_epoch(stamps: np.ndarray) -> np.ndarray:
    """The epoch each row was computed in (meaningless for NEVER)."""
    return stamps // STAMP_EPOCH


def training_stamp(epoch: int, iteration: int, rank: int, world_size: int) -> int:
    return epoch * STAMP_EPOCH + 1 + iteration * world_size + rank


class FeatureBank:
    """This rank's rows of the bank (global indices ``lo..hi-1``) and its outbox."""

    def __init__(self, n_images: int, comm: Comm, cfg: BankConfig, device: torch.device) -> None:
        self.n_images, self.comm = n_images, comm
        self.bounds = shard_bounds(n_images, comm.world_size)
        self.lo, self.hi = int(self.bounds[comm.rank]), int(self.bounds[comm.rank + 1])
        self.dtype = DTYPES[cfg.dtype]
        self.momentum = cfg.momentum
        self.device, self.memory = device, cfg.memory
        # where rows and outbox live: decided with the rows' width (:meth:`_allocate`)
        self.storage: Optional[torch.device] = {"device": device, "host": torch.device("cpu"),
                                                "auto": None}[cfg.memory]
        self.rows: Optional[torch.Tensor] = None  # (hi - lo, dim), allocated at the first row
        self.stamps = np.full(self.hi - self.lo, NEVER, dtype=np.int64)
        self._outbox = Outbox()

    # ---------------------------------------------------------------- the training pass

    def begin_pass(self, epoch: int, capacity: int) -> None:
        """Get ready for a training pass (or the rest of one) of at most ``capacity`` images."""
        self._outbox.release()
        self._outbox = Outbox(epoch, capacity, self.dtype, self.storage or torch.device("cpu"))

    def record(self, indices: torch.Tensor, iteration: int, features: torch.Tensor) -> None:
        """The features a training step computed for the images ``indices`` (global, host
        int64), the step's ``iteration`` in the pass (equal on every rank)."""
        self._outbox.add(indices, training_stamp(self._outbox.epoch, iteration, self.comm.rank,
                                                 self.comm.world_size), features)

    def flush(self) -> None:
        """Send every row of every rank's outbox to the rank that owns it, which takes it in
        (:meth:`_take_in`); called on every rank (a collective), after which the outboxes are
        empty."""
        indices, stamps, rows = self._outbox.take()
        owner = np.searchsorted(self.bounds, indices, side="right") - 1
        by_owner = np.argsort(owner, kind="stable")
        send_counts = np.bincount(owner, minlength=self.comm.world_size)
        counts = self.comm.all_gather_object((send_counts.tolist(), rows.shape[1] if rows.numel()
                                              else 0))
        self._allocate(max(dim for _, dim in counts))
        if self.rows is None:  # no row anywhere yet
            return
        recv_counts = [sent[self.comm.rank] for sent, _ in counts]
        meta = torch.from_numpy(np.stack([indices, stamps], axis=1)[by_owner])
        meta = self.comm.all_to_all_rows(meta, send_counts, recv_counts).numpy()
        payload = as_bytes(rows.reshape(-1, self.rows.shape[1])[torch.from_numpy(by_owner)
                                                                .to(rows.device)])
        received = from_bytes(self.comm.all_to_all_rows(payload, send_counts, recv_counts),
                              self.dtype)
        self._take_in(meta[:, 0] - self.lo, meta[:, 1], received, self.momentum)

    def end_pass(self) -> None:
        """After the training pass: flush, and give the outbox's memory back."""
        self.flush()
        self._outbox.release()

    @contextmanager
    def recording(self, epoch: int, capacity: int,
                  tap: Optional["TrainingFeatureTap"] = None) -> Iterator[None]:
        """Around a run of a training pass of at most ``capacity`` images: the outbox ready
        (and ``tap``, if given, reading each forward for :meth:`record`), then the rows'
        delivery to the ranks that own them."""
        self.begin_pass(epoch, capacity)
        with tap if tap is not None else nullcontext():
            yield
        self.end_pass()

    # ---------------------------------------------------------------- before a clustering

    def stale(self, epoch: int, max_age: int, unreadable: Optional[set[int]] = None) -> np.ndarray:
        """This rank's images (global, ascending) whose rows are older than ``max_age`` epochs
        at the start of ``epoch``, or were never computed; ``unreadable`` ones are left out."""
        old = (self.stamps == NEVER) | (epoch - stamp_epoch(self.stamps) > max_age)
        found = self.lo + np.flatnonzero(old)
        if unreadable:
            found = found[~np.isin(found, np.fromiter(unreadable, dtype=np.int64))]
        return found

    def refresh(self, computed: ShardFeatures, epoch: int) -> None:
        """Rows the refresh pass computed at the start of ``epoch`` (a collective: every rank
        calls it, with or without rows)."""
        dims = self.comm.all_gather_object(int(computed.features.shape[1])
                                           if len(computed.indices) else 0)
        self._allocate(max(dims))
        if len(computed.indices):
            self._take_in(computed.indices - self.lo,
                              np.full(len(computed.indices), epoch * STAMP_EPOCH),
                              torch.as_tensor(computed.features))

    def features(self) -> ShardFeatures:
        """What the clustering stage reads: this rank's rows that hold a feature, in index
        order (a copy in the bank's dtype, on its memory; the PCA works in float32 chunks)."""
        present = np.flatnonzero(self.stamps != NEVER)
        if self.rows is None:
            return ShardFeatures(features=torch.empty((0, 0)), indices=present)
        return ShardFeatures(features=self.rows[torch.from_numpy(present).to(self.rows.device)],
                             indices=self.lo + present)

    def ages(self, epoch: int) -> np.ndarray:
        """How many epochs old each present row is at the start of ``epoch`` (0: refreshed)."""
        present = self.stamps != NEVER
        return epoch - stamp_epoch(self.stamps[present])

    # ---------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint itself records; the rows are in the ranks' shard files."""
        return {"n_images": self.n_images, "dtype": str(self.dtype).removeprefix("torch.")}

    def shard_state(self) -> dict[str, Any]:
        """This rank's shard file: its rows and stamps (the outbox is flushed before a save)."""
        assert not self._outbox.count, "flush the outbox before a checkpoint"
        return {"lo": self.lo, "hi": self.hi, "stamps": self.stamps.copy(),
                "rows": None if self.rows is None else self.rows.cpu()}

    def load_shards(self, state: dict[str, Any], read: Callable[[int], dict[str, Any]]) -> None:
        """Restore this rank's rows from the shards of the ``len(state["shards"])`` ranks that
        wrote them, reading (``read(rank)``) only those that overlap its range."""
        if state["n_images"] != self.n_images or state["dtype"] != self.state_dict()["dtype"]:
            raise CheckpointError(f"the checkpoint's feature bank holds {state['n_images']} "
                             f"{state['dtype']} rows, this run's has {self.n_images} "
                             f"{self.state_dict()['dtype']}")
        old = shard_bounds(self.n_images, len(state["shards"]))
        for rank in range(len(state["shards"])):
            lo, hi = max(self.lo, int(old[rank])), min(self.hi, int(old[rank + 1]))
            if lo >= hi:
                continue
            shard = read(rank)
            part = slice(lo - shard["lo"], hi - shard["lo"])
            self.stamps[lo - self.lo:hi - self.lo] = shard["stamps"][part]
            if shard["rows"] is not None:
                self._allocate(shard["rows"].shape[1])
                self.rows[lo - self.lo:hi - self.lo] = shard["rows"][part].to(self.storage)

    # ---------------------------------------------------------------- internals

    def _allocate(self, dim: int) -> None:
        if self.rows is None and dim:
            if self.storage is None:  # memory=auto: the bank and an outbox of as many rows
                self.storage = plan("feature bank and its outbox", 2 * (self.hi - self.lo),
                                    dim, self.dtype.itemsize, self.device).device
            self.rows = torch.zeros((self.hi - self.lo, dim), dtype=self.dtype,
                                    device=self.storage)
            log.debug("feature bank: %d x %d %s rows on %s (%.1f MB)", self.hi - self.lo, dim,
                      self.dtype, self.storage, self.rows.numel() * self.rows.element_size() / 1e6)

    def _take_in(self, local: np.ndarray, stamps: np.ndarray, rows: torch.Tensor,
                     momentum: float = 0.0) -> None:
        """Take in the rows that are newer than what the bank holds (a row is never replaced
        by an older one), in stamp order: each replaces the bank's row, or with ``momentum``
        m blends into it (m * held + (1 - m) * new; a row never computed is replaced). An
        image given several times is taken in once per row, oldest first, so that rows
        delivered in one flush or in several end the same."""
        order = np.lexsort((stamps, local))  # by image, oldest first
        order = order[stamps[order] > self.stamps[local[order]]]
        if not order.size:
            return
        by_image = local[order]
        occurrence = np.arange(order.size) - np.searchsorted(by_image, by_image)
        if not momentum:  # only each image's newest row matters
            last = np.append(by_image[1:] != by_image[:-1], True)
            rounds = [order[last]]
        else:
            rounds = [order[occurrence == r] for r in range(int(occurrence.max()) + 1)]
        for chosen in rounds:
            at = local[chosen]
            new = rows[torch.from_numpy(chosen).to(rows.device)].to(self.storage, torch.float32)
            if momentum:
                held = torch.from_numpy(self.stamps[at] != NEVER).to(self.storage)[:, None]
                old = self.rows[torch.from_numpy(at).to(self.storage)].float()
                new = torch.where(held, momentum * old + (1 - momentum) * new, new)
            self._write(at, stamps[chosen], new)

    def _write(self, local: np.ndarray, stamps: np.ndarray, rows: torch.Tensor) -> None:
        """Rows at local positions ``local`` (distinct) with their stamps."""
        assert self.rows is not None
        self.rows[torch.from_numpy(local).to(self.storage)] = rows.to(self.storage, self.dtype)
        self.stamps[local] = stamps


class Outbox:
    """The rows a rank computed in its training pass, kept until the next flush."""

    def __init__(self, epoch: int = 0, capacity: int = 0, dtype: torch.dtype = torch.float32,
                 storage: torch.device = torch.device("cpu")) -> None:
        self.epoch, self.capacity, self.dtype, self.storage = epoch, capacity, dtype, storage
        self.indices = np.empty(capacity, dtype=np.int64)
        self.stamps = np.empty(capacity, dtype=np.int64)
        self.rows: Optional[torch.Tensor] = None  # allocated at the first row (its width)
        self.count = 0
        self.copying = False  # non-blocking copies from a GPU may be under way
        self._pinned: Optional[PinnedBuffer] = None

    def add(self, indices: torch.Tensor, stamp: int, features: torch.Tensor) -> None:
        """Rows of one step. From a GPU into host memory the copy does not wait for the GPU
        (pinned memory, non-blocking), so that a training step still queues its work and
        goes on; :meth:`take` waits for the copies."""
        n = indices.shape[0]
        if self.count + n > self.capacity:
            raise RuntimeError(f"feature bank outbox: {self.count + n} rows in a pass of "
                               f"{self.capacity} images")
        from_gpu = features.is_cuda and self.storage.type == "cpu"
        if self.rows is None:
            shape = (self.capacity, features.shape[1])
            if self.storage.type == "cpu":  # page-locked at its exact size (pinned.py)
                self._pinned = PinnedBuffer(shape, self.dtype, pin=from_gpu)
                self.rows = self._pinned.tensor
            else:
                self.rows = torch.empty(shape, dtype=self.dtype, device=self.storage)
        self.rows[self.count:self.count + n].copy_(features.detach().to(self.dtype),
                                                   non_blocking=from_gpu)
        self.copying = self.copying or from_gpu
        self.indices[self.count:self.count + n] = indices.numpy()
        self.stamps[self.count:self.count + n] = stamp
        self.count += n

    def take(self) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """The rows so far (indices, stamps, rows), leaving the outbox empty. Views, not
        copies (an outbox-sized copy at every flush would double its peak): valid until the
        next :meth:`add`, which the flush that takes them does not make."""
        self._wait()
        n, self.count = self.count, 0
        rows = self.rows[:n] if self.rows is not None else torch.empty((0, 0), dtype=self.dtype)
        return self.indices[:n], self.stamps[:n], rows

    def _wait(self) -> None:
        """Until the non-blocking copies from the GPU are done."""
        if self.copying:
            torch.cuda.synchronize()
            self.copying = False

    def release(self) -> None:
        """Free the rows (page-locked ones unlocked): the outbox is empty from now on."""
        assert not self.count, "flush the outbox before releasing it"
        self._wait()
        if self._pinned is not None:
            self._pinned.release()
            self._pinned = None
        self.rows = None


def as_bytes(rows: torch.Tensor) -> torch.Tensor:
    """(n, dim) rows of any dtype as (n, dim * itemsize) uint8: every backend exchanges bytes
    (gloo has no bfloat16). The width is spelt out: a flush may send no row at all (a stop
    before a pass's first step), and (0, -1) is no shape."""
    return rows.contiguous().view(torch.uint8).reshape(rows.shape[0],
                                                       rows.shape[1] * rows.element_size())


def from_bytes(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return data.contiguous().view(dtype)


class TrainingFeatureTap:
    """Reads the clustering features of each training forward through a hook on the layer
    that computes them (DeepClusterNet.clustering_feature_layer), before the in-place ReLU
    after it overwrites them; used as a context manager around a training pass."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.last: Optional[torch.Tensor] = None
        self._handle: Any = None

    def __enter__(self) -> "TrainingFeatureTap":
        def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.last = output.detach().flatten(1).clone()

        self._handle = self.layer.register_forward_hook(keep)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
        self.last = None

    def take(self) -> torch.Tensor:
        """The features of the forward just run."""
        if self.last is None:
            raise RuntimeError("no training forward has run through the tapped layer")
        features, self.last = self.last, None
        return features
