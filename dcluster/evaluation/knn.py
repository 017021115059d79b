"""Weighted k-nearest-neighbour classification on frozen features (the protocol of DINO,
Caron et al. 2021, after Wu et al. 2018): cosine similarity between L2-normalised features,
the k most similar training images vote for their class with weight exp(similarity / T).

Sharded: no rank ever holds more than its own share of either side. The training features
(the memory bank) stay where the feature pass left them, N/R rows per rank; the queries (the
held-out split) travel in chunks of QUERY_CHUNK rows, each broadcast by the rank that owns it,
every rank searches its own bank shard for the chunk's k nearest, and the R short lists
(k similarities and class numbers a query each) are merged into the global k nearest, which is
exact: a row of the global top k is in the top k of its own shard. At ImageNet's size, raw
4096-d features gathered on one rank (the gathered search this replaces) would take 21 GB,
plus a copy in a FAISS index on every GPU.

The search is a GEMM on the rank's device (torch, the same code on a GPU as on the CPU), the
bank kept there when the memory plan finds room and streamed from host memory a block at a
time when it does not; DINO's own k-NN (``eval_knn.py``) computes it the same way.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch

from dcluster.clustering.pca import l2_normalize
from dcluster.core.logs import progress
from dcluster.evaluation.scoring import TOP_KS, hits_to_accuracy, topk_hits
from dcluster.parallel.collectives import Comm
from dcluster.parallel.memory_plan import plan

log = logging.getLogger("dcluster.eval")

QUERY_CHUNK = 1024
"""Queries searched at a time: their similarities to one bank block are QUERY_CHUNK x
BANK_BLOCK float32 (128 MB)."""

BANK_BLOCK = 32768
"""Bank rows per similarity GEMM."""


def knn_accuracy(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray,
                 query_labels: np.ndarray, k: int, temperature: float, n_classes: int,
                 comm: Comm, device: torch.device, progress_mode: str = "never",
                 ks: tuple[int, ...] = TOP_KS) -> dict[str, float]:
    """{"top1", "top5"} of the weighted k-NN over every rank's ``queries`` against every
    rank's ``bank`` (this rank's rows of each, float32 (n, D), with their classes); the same on
    every rank. Call on every rank."""
    searcher = BankShard(bank, bank_labels, device)
    query_counts = comm.all_gather_object(len(queries))
    total_bank = int(comm.all_reduce_sum(np.array([len(bank)], dtype=np.int64))[0])
    k = min(k, total_bank)
    # the feature width, agreed: a rank without rows may hold a (0, 0) array
    width = int(comm.all_reduce_max(np.array([max(bank.shape[1], queries.shape[1])],
                                             dtype=np.int64))[0])
    xq = l2_normalize(np.ascontiguousarray(queries, dtype=np.float32).copy()) if len(queries) \
        else np.empty((0, width), np.float32)
    hits = np.zeros(len(ks), dtype=np.int64)
    chunks = [(src, lo) for src, n in enumerate(query_counts) for lo in range(0, n, QUERY_CHUNK)]
    for src, lo in progress(chunks, len(chunks), "k-NN query chunks", progress_mode,
                            comm.is_main):
        m = min(QUERY_CHUNK, query_counts[src] - lo)
        chunk = np.empty((m, width), dtype=np.float32)
        if comm.rank == src:
            chunk[...] = xq[lo:lo + m]
        comm.broadcast(chunk, src)
        similarity, classes = merged_neighbours(searcher.nearest(chunk, k), comm)
        if comm.rank == src:
            votes = class_votes(similarity, classes, temperature, n_classes)
            hits += topk_hits(votes, query_labels[lo:lo + m], ks)
    comm.all_reduce_sum(hits)
    return hits_to_accuracy(hits, sum(query_counts), ks)


class BankShard:
    """This rank's L2-normalised bank rows, on ``device`` where they fit, and their classes."""

    def __init__(self, bank: np.ndarray, labels: np.ndarray, device: torch.device) -> None:
        rows = l2_normalize(np.ascontiguousarray(bank, dtype=np.float32).copy()) if len(bank) \
            else np.empty((0, 0), np.float32)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.device = device
        where = plan("k-NN bank", rows.shape[0], max(rows.shape[1], 1), 4, device).device \
            if len(rows) else torch.device("cpu")
        self.rows = torch.from_numpy(rows).to(where)

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for lo in range(0, self.rows.shape[0], BANK_BLOCK):
            yield lo, self.rows[lo:lo + BANK_BLOCK].to(self.device, non_blocking=True)

    @torch.no_grad()
    def nearest(self, chunk: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities float32 (m, k), classes int64 (m, k)) of each query's k nearest
        rows of this shard, padded with -inf / -1 where the shard has fewer than k rows."""
        m = chunk.shape[0]
        best = torch.full((m, k), -float("inf"), device=self.device)
        where = torch.full((m, k), -1, dtype=torch.int64, device=self.device)
        if self.rows.shape[0] == 0:  # a rank without memory rows offers no neighbours
            return best.cpu().numpy(), where.cpu().numpy()
        queries = torch.from_numpy(chunk).to(self.device)
        for lo, block in self.blocks():
            sims = queries @ block.T
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            both = torch.cat([best, top.values], dim=1)
            rows = torch.cat([where, top.indices + lo], dim=1)
            keep = both.topk(k, dim=1)
            best, where = keep.values, rows.gather(1, keep.indices)
        classes = torch.where(where >= 0, self.labels.to(self.device)[where.clamp(min=0)], -1)
        return best.cpu().numpy(), classes.cpu().numpy()


def merged_neighbours(mine: tuple[np.ndarray, np.ndarray], comm: Comm
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest over every rank's shard from each rank's own k nearest (a sum over ranks
    of arrays each rank fills one slot of: R x m x k numbers, whatever N is)."""
    similarity, classes = mine
    m, k = similarity.shape
    all_sims = np.zeros((comm.world_size, m, k), dtype=np.float64)
    all_classes = np.zeros((comm.world_size, m, k), dtype=np.int64)
    all_sims[comm.rank], all_classes[comm.rank] = similarity, classes
    comm.all_reduce_sum(all_sims)
    comm.all_reduce_sum(all_classes)
    sims = np.moveaxis(all_sims, 0, 1).reshape(m, -1)
    labels = np.moveaxis(all_classes, 0, 1).reshape(m, -1)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(labels, order, 1)


def class_votes(similarity: np.ndarray, classes: np.ndarray, temperature: float,
                n_classes: int) -> np.ndarray:
    """float64 (m, n_classes): each neighbour's exp(similarity / T) added to its class
    (padding, class -1, adds nothing)."""
    real = classes >= 0
    weights = np.where(real, np.exp(np.where(real, similarity, 0.0) / temperature), 0.0)
    votes = np.zeros((similarity.shape[0], n_classes))
    rows = np.broadcast_to(np.arange(similarity.shape[0])[:, None], classes.shape)
    np.add.at(votes, (rows[real], classes[real]), weights[real])
    return votes
