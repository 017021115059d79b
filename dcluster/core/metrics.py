"""Clustering quality measures: NMI (the paper's section 4.1), Hungarian accuracy, cluster sizes.

Label values are arbitrary integers (pseudo-labels, class ids); every distinct value is one
group, negative ones included, so callers drop excluded images before scoring. Everything
works from the sparse contingency table, so 10,000 clusters against 1,000 classes over
millions of images never builds a dense N-sized loop.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def _codes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Both labelings re-coded to 0..K-1, and the number of distinct values of ``b``."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in length: {a.size} and {b.size}")
    if a.size == 0:
        raise ValueError("label arrays are empty")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    return ia.ravel().astype(np.int64), ib.ravel().astype(np.int64), int(ib.max()) + 1


def contingency(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-zero cells of the contingency table as (row, column, count), rows indexing the
    sorted distinct values of ``a`` and columns those of ``b``."""
    ia, ib, kb = _codes(a, b)
    cells, counts = np.unique(ia * kb + ib, return_counts=True)
    return cells // kb, cells % kb, counts


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """I(A; B) / sqrt(H(A) H(B)), the normalisation of the paper.

    Degenerate cases: when both entropies are 0 both labelings put every item in one group,
    i.e. they are the same partition, and the result is 1.0; when exactly one is 0 the mutual
    information is 0 too and the result is 0.0. Rounding is clipped to [0, 1].
    """
    rows, cols, counts = contingency(a, b)
    n = int(counts.sum())
    row_tot = np.bincount(rows, weights=counts)
    col_tot = np.bincount(cols, weights=counts)
    h_a, h_b = _entropy(row_tot, n), _entropy(col_tot, n)
    if h_a == 0.0 and h_b == 0.0:
        return 1.0
    if h_a == 0.0 or h_b == 0.0:
        return 0.0
    mi = float((counts / n * np.log(counts * n / (row_tot[rows] * col_tot[cols]))).sum())
    return float(np.clip(mi / np.sqrt(h_a * h_b), 0.0, 1.0))


def clustering_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of items whose cluster maps to their class under the best one-to-one map
    (Hungarian matching). With more clusters than classes the unmatched clusters count as
    wrong; with fewer, the unmatched classes do."""
    rows, cols, counts = contingency(pred, truth)
    table = np.zeros((rows.max() + 1, cols.max() + 1), dtype=np.int64)
    table[rows, cols] = counts
    r, c = linear_sum_assignment(table, maximize=True)
    return float(table[r, c].sum() / counts.sum())
