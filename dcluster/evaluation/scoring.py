"""The scores the protocols report: top-k accuracy of class scores (knn, linear) and NMI /
Hungarian accuracy of a partition against the classes (clusters)."""
from __future__ import annotations

import numpy as np

from dcluster.core.metrics import clustering_accuracy, nmi


TOP_KS = (1, 5)


def topk_hits(scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = TOP_KS
              ) -> np.ndarray:
    """int64 (len(ks),): how many rows have their label among their k highest scores (k
    capped at the number of classes; ties broken by class number). Counts, not fractions, so
    that the ranks' shares of a split add up (:func:`hits_to_accuracy`)."""
    ranked = np.argsort(-scores, axis=1, kind="stable")
    return np.array([(ranked[:, :min(k, scores.shape[1])] == labels[:, None]).any(1).sum()
                     for k in ks], dtype=np.int64)


def hits_to_accuracy(hits: np.ndarray, rows: int, ks: tuple[int, ...] = TOP_KS
                     ) -> dict[str, float]:
    """{"top1": ..., "top5": ...} from :func:`topk_hits` summed over ``rows`` rows."""
    return {f"top{k}": float(h) / max(rows, 1) for k, h in zip(ks, hits)}


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = TOP_KS
                  ) -> dict[str, float]:
    """{"top1": ..., "top5": ...}: the fraction of rows whose label is among their k highest
    scores (k capped at the number of classes; ties broken by class number)."""
    return hits_to_accuracy(topk_hits(scores, labels, ks), len(labels), ks)


def label_scores(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"nmi": nmi(pred, labels), "acc": clustering_accuracy(pred, labels)}

