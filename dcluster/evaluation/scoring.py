"""The scores the protocols report: top-k accuracy of class scores (knn, linear) and NMI /
Hungarian accuracy of a partition against the classes (clusters)."""
from __future__ import annotations

import numpy as np

from dcluster.core.metrics import clustering_accuracy, nmi


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)
                  ) -> dict[str, float]:
    """{"top1": ..., "top5": ...}: the fraction of rows whose label is among their k highest
    scores (k capped at the number of classes; ties broken by class number)."""
    ranked = np.argsort(-scores, axis=1, kind="stable")
    return {f"top{k}": float((ranked[:, :min(k, scores.shape[1])] == labels[:, None]).any(1).mean())
            for k in ks}


def label_scores(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"nmi": nmi(pred, labels), "acc": clustering_accuracy(pred, labels)}

