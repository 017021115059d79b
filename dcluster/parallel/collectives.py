"""The few collectives an epoch needs, on numpy arrays, as one code path for every world size.

With a single process there is no process group and each operation is the identity, so the
stages call them unconditionally instead of branching on the world size. Arrays are worked on
in place through zero-copy torch views; with NCCL, whose tensors must live on the GPU, they go
through the GPU in chunks of CHUNK_BYTES, so a large array (the N labels, a D x D covariance)
never needs a second full copy on either side.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from dcluster.parallel.distributed import Env

CHUNK_BYTES = 64 << 20

GATHER_ROUND_BYTES = 4 << 20
"""All ranks' rows of one :meth:`Comm.gather_rows` round. Rank 0 holds them twice while a
round lasts (gloo's gather receives into one flat tensor, then copies it into the per-rank
outputs: torch/csrc/distributed/c10d/ProcessGroupGloo.cpp, ``AsyncGatherWork``) and its own
padded send buffer, next to the gathered matrix: at 64 MB a round (CHUNK_BYTES, since commit
d854d04) this put 0.2-0.3 x the 256-d matrix of 500k rows on top of rank 0's peak
(benchmarks/bench_dist_clustering.py). At 4 MB, 1.28M rows take about 330 rounds."""


class Comm:
    """The job's collectives, seen from one rank. Its place in the job (rank, world size,
    main or not) is read from its ``env``, never copied, so the two cannot disagree.

    With NCCL a second, gloo group over the same ranks is created too (:meth:`on_host`): a
    rank blocked in an NCCL collective keeps a kernel spinning on its GPU, which is wrong
    while rank 0's FAISS is using that GPU, so such waits go through host memory instead."""

    def __init__(self, env: Env, group: Optional[dist.ProcessGroup] = None,
                 timeout_s: Optional[float] = None) -> None:
        """``timeout_s``: the collective timeout of the gloo side group (the job's
        ``distributed.timeout_s``); None leaves torch's default, 30 minutes."""
        self.env = env
        if env.world_size > 1 and not dist.is_initialized():
            raise RuntimeError(f"world size {env.world_size} but no process group: "
                               "create Comm inside distributed.process_group")
        self.group = group  # None: the default group
        nccl = env.world_size > 1 and dist.get_backend(group) == "nccl"
        # where collectives stage their tensors, not necessarily the rank's own device
        self.device = env.device if nccl else torch.device("cpu")
        # every rank creates the group here, in the same order, as new_group requires. Its
        # timeout must be given: new_group does not inherit the default group's but takes
        # torch's default (torch 2.14.1 distributed_c10d.py, _new_group_with_tag, line 6954:
        # ``if timeout is None: timeout = _get_default_timeout(backend)``, 30 minutes), and
        # ranks wait in this group while rank 0 clusters, which can take longer
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        self._host = (Comm(env, dist.new_group(backend="gloo", timeout=timeout))
                      if nccl else self)

    def on_host(self) -> "Comm":
        """These collectives on a CPU (gloo) group: for waits that must leave the GPU idle."""
        return self._host

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Sum ``array`` over all ranks, in place; returns it."""
        if self.world_size > 1:
            self._chunked(array, lambda t: dist.all_reduce(t, group=self.group), receive=True)
        return array

    def all_reduce_max(self, array: np.ndarray) -> np.ndarray:
        """Element-wise maximum of ``array`` over all ranks, in place; returns it."""
        if self.world_size > 1:
            self._chunked(array, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX,
                                                           group=self.group), receive=True)
        return array

    def broadcast(self, array: np.ndarray, src: int = 0) -> np.ndarray:
        """Rank ``src``'s ``array`` into every rank's ``array`` (same shape and dtype)."""
        if self.world_size > 1:
            self._chunked(array, lambda t: dist.broadcast(t, src, group=self.group),
                          receive=self.rank != src)
        return array

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """A small picklable object from rank ``src``; the others pass anything (e.g. None)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src, group=self.group, device=self._object_device())
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's small picklable object, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_rows(self, rows: np.ndarray, counts: Sequence[int],
                    out: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """Every rank's ``rows`` stacked on rank 0 in rank order (rank r sends ``counts[r]``
        rows); None on the other ranks.

        One ``gather`` collective per round of at most GATHER_ROUND_BYTES in all, each rank's block
        padded to the round's row count: point-to-point sends would make NCCL build a
        communicator for every (sender, rank 0) pair. Rank 0 may pass ``out`` with its own
        block already written in place (as the clustering stage does), which saves it a copy
        of its share; otherwise its rows are copied in."""
        offsets = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
        if len(counts) != self.world_size or rows.shape[0] != counts[self.rank]:
            raise ValueError(f"rank {self.rank}: {rows.shape[0]} rows, counts {list(counts)}")
        if self.is_main:
            if out is None:
                out = np.empty((int(offsets[-1]), *rows.shape[1:]), dtype=rows.dtype)
            own = out[: offsets[1]]
            if not _same_block(own, rows):
                own[...] = rows
        if self.world_size == 1:
            return out
        row_bytes = max(1, int(np.prod(rows.shape[1:], dtype=np.int64)) * rows.itemsize)
        round_bytes = min(CHUNK_BYTES, GATHER_ROUND_BYTES)
        step = max(1, round_bytes // (row_bytes * self.world_size))
        source = torch.from_numpy(np.ascontiguousarray(rows))
        send = torch.zeros((step, *rows.shape[1:]), dtype=source.dtype, device=self.device)
        received = ([torch.empty_like(send) for _ in range(self.world_size)]
                    if self.is_main else None)
        for lo in range(0, max(counts), step):
            n = _rows_in_round(counts[self.rank], lo, step)
            if not self.is_main:  # rank 0's own rows are in place already
                send[:n] = source[lo:lo + n]
            dist.gather(send, received, dst=0, group=self.group)
            if self.is_main:
                for src in range(1, self.world_size):
                    m = _rows_in_round(counts[src], lo, step)
                    start = int(offsets[src]) + lo
                    out[start:start + m] = received[src][:m].cpu().numpy()
        return out if self.is_main else None

    def all_to_all_rows(self, rows: torch.Tensor, send_counts: Sequence[int],
                        recv_counts: Sequence[int]) -> torch.Tensor:
        """Personalised exchange: this rank's ``rows``, grouped by destination rank in rank
        order (``send_counts[r]`` rows for rank r), go to their ranks; returns the rows this
        rank receives, grouped by source rank (``recv_counts[s]`` from rank s), on the device
        ``rows`` came from. Each row travels once, to its one destination.

        In rounds of at most CHUNK_BYTES sent by each rank (and as many received), each
        staged through the collectives' device: with NCCL a bank kept in host memory
        (clustering.bank.memory=host) never has more than a round of it on the GPU."""
        if self.world_size == 1:
            return rows
        sent_at = np.concatenate(([0], np.cumsum(send_counts, dtype=np.int64)))
        received_at = np.concatenate(([0], np.cumsum(recv_counts, dtype=np.int64)))
        out = rows.new_empty((int(received_at[-1]), *rows.shape[1:]))
        row_bytes = max(1, int(np.prod(rows.shape[1:], dtype=np.int64)) * rows.element_size())
        step = max(1, CHUNK_BYTES // (row_bytes * self.world_size))  # rows per pair per round
        longest = int(self.all_reduce_max(np.array([max(send_counts)], dtype=np.int64))[0])
        for lo in range(0, longest, step):
            sends = [_rows_in_round(int(n), lo, step) for n in send_counts]
            receives = [_rows_in_round(int(n), lo, step) for n in recv_counts]
            staged = torch.cat([rows[int(sent_at[r]) + lo:int(sent_at[r]) + lo + n]
                                for r, n in enumerate(sends)]).to(self.device)
            got = staged.new_empty((sum(receives), *rows.shape[1:]))
            dist.all_to_all_single(got, staged, receives, sends, group=self.group)
            at = 0
            for src, n in enumerate(receives):
                start = int(received_at[src]) + lo
                out[start:start + n] = got[at:at + n].to(out.device)
                at += n
        return out

    def all_gather_segments(self, full: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
        """Fill ``full`` (the same shape everywhere) on every rank from its owners: rank r
        owns ``full[bounds[r]:bounds[r + 1]]``. In place; returns ``full``."""
        for src in range(self.world_size):
            self.broadcast(full[bounds[src]: bounds[src + 1]], src)
        return full

    def _chunked(self, array: np.ndarray, op: Callable[[torch.Tensor], Any], receive: bool) -> None:
        """Apply the collective ``op`` to ``array`` chunk by chunk, in place; on a GPU
        backend each chunk is staged through the device (and copied back if ``receive``)."""
        if not array.flags.c_contiguous:
            raise ValueError("collectives work on C-contiguous arrays")
        flat = torch.from_numpy(array.reshape(-1))
        step = max(1, CHUNK_BYTES // max(array.itemsize, 1))
        for lo in range(0, flat.numel(), step):
            part = flat[lo: lo + step]
            if self.device.type == "cpu":
                op(part)
                continue
            staged = part.to(self.device)
            op(staged)
            if receive:
                part.copy_(staged.cpu())

    def _object_device(self) -> Optional[torch.device]:
        return self.device if self.device.type == "cuda" else None


def _rows_in_round(count: int, lo: int, step: int) -> int:
    """How many of a rank's ``count`` rows fall in the gather round starting at row ``lo``."""
    return max(0, min(step, count - lo))


def _same_block(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` are views of the very same memory block."""
    return (a.shape == b.shape and a.dtype == b.dtype and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])
