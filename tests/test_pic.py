"""Power Iteration Clustering: graph construction, exact recovery, the sigma trend."""
import numpy as np
import pytest

from dcluster.clustering.pic import knn_graph, power_iteration, run_pic, steepest_ascent
from dcluster.core.metrics import nmi

DEFAULTS = dict(alpha=1e-3, knn=5, iterations=10, device="cpu")


def sphere_blobs(n_blobs: int, per_blob: int, d: int = 8, noise: float = 0.05, seed: int = 0):
    """L2-normalised points around random unit centres (PIC runs on normalised features)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, d))
    truth = np.repeat(np.arange(n_blobs), per_blob)
    x = centres[truth] / np.linalg.norm(centres[truth], axis=1, keepdims=True)
    x = x + noise * rng.standard_normal(x.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def test_blobs_of_knn_plus_one_points_are_recovered_exactly():
    # each point's 5 neighbours are the rest of its 6-point blob: one complete graph per blob,
    # whose single maximum of v every other node points to
    x, truth = sphere_blobs(10, 6)
    order = np.random.default_rng(1).permutation(len(x))
    result = run_pic(x[order], sigma=0.2, **DEFAULTS)
    assert result.n_clusters == 10
    assert nmi(result.labels, truth[order]) == 1.0
    assert result.labels.dtype == np.int64
    np.testing.assert_array_equal(result.sizes, np.full(10, 6))


def test_clusters_never_span_separated_blobs():
    x, truth = sphere_blobs(4, 50)
    result = run_pic(x, sigma=0.2, **DEFAULTS)
    assert result.n_clusters >= 4
    for c in range(result.n_clusters):
        assert len(np.unique(truth[result.labels == c])) == 1


def test_larger_sigma_never_gives_more_clusters():
    # on this data: 132, 14, 12, 8, 7, 7 clusters for the sigmas below
    x, _ = sphere_blobs(4, 50)
    counts = [run_pic(x, sigma=s, **DEFAULTS).n_clusters for s in (0.01, 0.02, 0.05, 0.1, 0.2, 1.0)]
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert counts[0] > 2 * counts[-1], counts


def test_each_cluster_has_exactly_one_local_maximum():
    x, _ = sphere_blobs(4, 50, noise=0.3)
    g = knn_graph(x, 5, ngpu=0)
    g.data = np.exp(-g.data / 0.2**2)
    a = (g + g.T).tocsr()
    v = power_iteration(a, 1e-3, 10)
    src, dst = steepest_ascent(a, v)
    assert (v[dst] > v[src]).all()  # every edge climbs, so the pointer graph has no cycle
    result = run_pic(x, sigma=0.2, **DEFAULTS)
    roots = np.setdiff1d(np.arange(len(x)), src)
    assert len(roots) == result.n_clusters
    assert len(np.unique(result.labels[roots])) == result.n_clusters


def test_knn_graph_excludes_self_even_with_duplicates():
    x, _ = sphere_blobs(3, 10)
    x = np.concatenate([x, x[:4]])  # exact twins may be ranked before the point itself
    g = knn_graph(x, 5, ngpu=0)
    assert g.diagonal().max() == 0 and (np.diff(g.indptr) == 5).all()
    assert (g.data >= 0).all()
    for i in range(4):  # twins are each other's nearest neighbour, stored at distance 0
        twin = len(x) - 4 + i
        assert twin in g[[i]].indices and i in g[[twin]].indices


def test_power_iteration_stays_l1_normalised():
    x, _ = sphere_blobs(3, 20)
    g = knn_graph(x, 5, ngpu=0)
    g.data = np.exp(-g.data / 0.2**2)
    v = power_iteration((g + g.T).tocsr(), 0.5, 20)
    assert v.min() > 0 and v.sum() == pytest.approx(1.0)


def test_invalid_parameters_are_rejected():
    x, _ = sphere_blobs(1, 5)
    with pytest.raises(ValueError, match="more than 5 points"):
        run_pic(x, sigma=0.2, **DEFAULTS)
    with pytest.raises(ValueError, match="sigma"):
        run_pic(x, sigma=0.0, **DEFAULTS)
