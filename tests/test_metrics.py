"""NMI, Hungarian accuracy and size statistics against independent computations."""
import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from dcluster.core.metrics import clustering_accuracy, contingency, nmi


def test_nmi_hand_computed_example():
    # A = {0,1 | 2,3}, B = {0 | 1,2,3}: H(A) = ln 2, H(B) = H(1/4, 3/4),
    # I = H(B) - H(B|A) = H(B) - 1/2 * H(1/2, 1/2)
    a, b = [0, 0, 1, 1], [5, 7, 7, 7]
    h_a = math.log(2)
    h_b = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    mi = h_b - 0.5 * math.log(2)
    assert nmi(a, b) == pytest.approx(mi / math.sqrt(h_a * h_b), rel=1e-12)


@pytest.mark.parametrize("ka,kb,n", [(10, 10, 500), (300, 20, 5000), (2, 50, 200)])
def test_nmi_matches_sklearn_geometric(ka, kb, n):
    rng = np.random.default_rng(ka * kb)
    a = rng.integers(0, ka, n) * 7 - 3  # arbitrary, negative and sparse label values
    b = (a // 2 + rng.integers(0, kb, n)) % kb
    expected = normalized_mutual_info_score(a, b, average_method="geometric")
    assert nmi(a, b) == pytest.approx(expected, abs=1e-10)
    assert nmi(b, a) == pytest.approx(expected, abs=1e-10)


def test_nmi_invariances_and_degenerate_cases():
    a = np.array([3, 3, 1, 1, 2, 2])
    assert nmi(a, a) == 1.0
    assert nmi(a, 10 - a * 4) == pytest.approx(1.0)  # renaming labels changes nothing
    assert nmi(np.zeros(5), np.ones(5)) == 1.0  # both one group: the same partition
    assert nmi(np.zeros(6), a) == 0.0  # one side carries no information
    assert nmi([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-12)  # independent
    with pytest.raises(ValueError, match="differ in length"):
        nmi([0, 1], [0, 1, 2])


def test_contingency_cells():
    rows, cols, counts = contingency([5, 5, 9, 9, 9], [1, 2, 2, 2, 1])
    assert sorted(zip(rows.tolist(), cols.tolist(), counts.tolist())) == [
        (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 2)]


def brute_force_accuracy(pred, truth):
    clusters, classes = np.unique(pred), np.unique(truth)
    best = 0
    small, large = sorted([clusters, classes], key=len)
    for perm in itertools.permutations(large, len(small)):
        mapping = dict(zip(small, perm))
        if len(small) == len(clusters):
            hits = sum(mapping[p] == t for p, t in zip(pred, truth))
        else:
            hits = sum(mapping[t] == p for p, t in zip(pred, truth))
        best = max(best, hits)
    return best / len(pred)


@pytest.mark.parametrize("kp,kt", [(4, 4), (5, 3), (2, 5)])
def test_accuracy_matches_brute_force(kp, kt):
    rng = np.random.default_rng(kp * 10 + kt)
    for _ in range(5):
        truth = rng.integers(0, kt, 40)
        pred = np.where(rng.random(40) < 0.6, truth % kp, rng.integers(0, kp, 40))
        assert clustering_accuracy(pred, truth) == pytest.approx(brute_force_accuracy(pred, truth))


def test_accuracy_rectangular_unmatched_clusters_count_as_wrong():
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 2])  # class 0 split in two: one half unmatched
    assert clustering_accuracy(pred, truth) == pytest.approx(6 / 8)
    assert clustering_accuracy(truth, pred) == pytest.approx(6 / 8)
    assert clustering_accuracy(pred, pred + 100) == 1.0
