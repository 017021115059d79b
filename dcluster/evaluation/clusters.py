"""Clustering quality of frozen features (the MMDC paper's Table I metrics): k-means with
k = the number of classes, scored against the classes by NMI and Hungarian accuracy.

The features are centred and L2-normalised, as for DeepCluster's per-epoch class probe
(eval.class_kmeans), and not whitened: whitening lifts directions that hold only noise to unit
variance, as loud as the ones that separate the classes. k-means is seeded by k-means++ (see
clustering/kmeanspp.py), so that the score measures the features rather than the seeding.
"""
from __future__ import annotations

import numpy as np

from dcluster.clustering import kmeans_labels
from dcluster.clustering.pca import l2_normalize
from dcluster.evaluation.scoring import label_scores


def kmeans_scores(features: np.ndarray, labels: np.ndarray, seed: int, niter: int = 20,
                  device: str = "auto", backend: str = "auto") -> dict[str, float]:
    """{"nmi", "acc"} of k-means (k = number of distinct labels) on ``features``."""
    centred = np.ascontiguousarray(features - features.mean(axis=0), dtype=np.float32)
    pred = kmeans_labels(l2_normalize(centred), len(np.unique(labels)), seed, niter, device,
                         plus_plus=True, backend=backend)
    return label_scores(pred, labels)
