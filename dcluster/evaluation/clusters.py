"""Clustering quality of frozen features (the MMDC paper's Table I metrics): k-means with
k = the number of classes, scored against the classes by NMI and Hungarian accuracy.

The features are centred and L2-normalised, as for DeepCluster's per-epoch class probe
(eval.class_kmeans), and not whitened: whitening lifts directions that hold only noise to unit
variance, as loud as the ones that separate the classes. k-means is seeded by k-means++ (see
clustering/kmeanspp.py), so that the score measures the features rather than the seeding.

Sharded like training's clustering stage: every rank keeps its own rows, the mean is an
all-reduce, k-means++ gathers only its seeding sample (k x 64 rows at most), Lloyd's
iterations run on the one engine across the ranks, and only the cluster numbers (one integer an
image) reach rank 0 for the scores.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from dcluster.clustering import kmeans_labels
from dcluster.clustering.distributed_stage import global_mean
from dcluster.clustering.pca import l2_normalize
from dcluster.evaluation.scoring import label_scores
from dcluster.parallel.collectives import Comm


def kmeans_scores(features: np.ndarray, labels: np.ndarray, seed: int, comm: Comm,
                  device: torch.device, niter: int = 20, kmeans_device: str = "auto",
                  backend: str = "auto") -> dict[str, float]:
    """{"nmi", "acc"} of k-means (k = number of distinct labels over all ranks) on every
    rank's ``features`` (float32 (n, D), this rank's rows, with their ``labels``); the same on
    every rank. Call on every rank; ``device`` is the rank's own."""
    present = np.zeros(int(comm.all_reduce_max(np.array([labels.max(initial=0)]))[0]) + 1,
                       dtype=np.int64)
    present[np.unique(labels)] = 1
    k = int(np.count_nonzero(comm.all_reduce_max(present)))
    centred = np.ascontiguousarray(features - global_mean(features, comm), dtype=np.float32)
    pred = kmeans_labels(l2_normalize(centred), k, seed, niter, kmeans_device, plus_plus=True,
                         backend=backend, comm=comm, own_device=device)
    return comm.broadcast_object(scores_on_main(pred, labels, comm))


def scores_on_main(pred: np.ndarray, labels: np.ndarray, comm: Comm
                   ) -> Optional[dict[str, float]]:
    """NMI and accuracy of every rank's cluster numbers ``pred`` against its ``labels``,
    computed on rank 0 from the two integer columns (None elsewhere)."""
    counts = comm.all_gather_object(len(pred))
    pred_all = comm.gather_rows(np.ascontiguousarray(pred, dtype=np.int64), counts)
    labels_all = comm.gather_rows(np.ascontiguousarray(labels, dtype=np.int64), counts)
    return None if pred_all is None else label_scores(pred_all, labels_all)
