"""Weighted k-nearest-neighbour classification on frozen features (the protocol of DINO,
Caron et al. 2021, after Wu et al. 2018): cosine similarity between L2-normalised features,
the k most similar training images vote for their class with weight exp(similarity / T).

The neighbours come from an exact FAISS search (on all GPUs when a FAISS GPU build sees any,
see clustering.kmeans). Between unit vectors the L2 distance orders neighbours exactly as
cosine similarity does (||a - b||^2 = 2 - 2 cos), so the same flat L2 index as k-means serves.
"""
from __future__ import annotations

import numpy as np

from dcluster.clustering.kmeans import as_points, flat_l2_index, resolve_gpus
from dcluster.clustering.pca import l2_normalize


def knn_scores(train: np.ndarray, train_labels: np.ndarray, queries: np.ndarray, k: int,
               temperature: float, n_classes: int, device: str = "auto") -> np.ndarray:
    """float64 (Q, n_classes) class votes of each query."""
    bank = l2_normalize(as_points(train).copy())
    xq = l2_normalize(as_points(queries).copy())
    k = min(k, len(bank))
    index = flat_l2_index(bank.shape[1], resolve_gpus(device))
    index.add(bank)
    distances, neighbours = index.search(xq, k)
    weights = np.exp((1.0 - distances.astype(np.float64) / 2.0) / temperature)
    votes = np.zeros((len(xq), n_classes))
    np.add.at(votes, (np.arange(len(xq))[:, None], train_labels[neighbours]), weights)
    return votes

