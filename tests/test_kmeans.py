"""FAISS k-means wrapper: recovery, determinism, empty clusters, no subsampling, device choice."""
import logging
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from dcluster.clustering import kmeans_labels
from dcluster.clustering.kmeans import resolve_gpus, run_kmeans
from dcluster.core.metrics import nmi


def blobs(n_blobs: int, n: int, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_blobs, d)) * 10
    truth = rng.integers(0, n_blobs, n)
    return (centers[truth] + rng.standard_normal((n, d))).astype(np.float32), truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_separated_blobs_are_recovered(seed):
    # FAISS initialises from k random points (as in the paper), so with many blobs a run can
    # settle in a local minimum; two blobs are recovered from any initialisation.
    x, truth = blobs(2, 2000)
    result = run_kmeans(x, 2, seed=seed, niter=10, device="cpu")
    assert nmi(result.labels, truth) > 0.99


def test_many_blobs_are_never_mixed_with_enough_centroids():
    x, truth = blobs(6, 3000)
    labels = run_kmeans(x, 48, seed=0, niter=10).labels
    for c in np.unique(labels):
        assert len(np.unique(truth[labels == c])) == 1, f"cluster {c} spans several blobs"


def test_same_seed_same_labels_other_seed_other_run():
    x, truth = blobs(5, 2000, d=4)
    a = run_kmeans(x, 20, seed=3, niter=5)
    b = run_kmeans(x, 20, seed=3, niter=5)
    c = run_kmeans(x, 20, seed=4, niter=5)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.objective == b.objective
    assert not np.array_equal(a.labels, c.labels)
    assert nmi(c.labels, truth) > 0.6  # still a clustering of the blobs, not noise


def within_cluster_sum(x: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of the points to the mean of their cluster: the least
    objective any centroids can give these labels."""
    return sum(float(((x[labels == c] - x[labels == c].mean(axis=0)) ** 2).sum(dtype=np.float64))
               for c in np.unique(labels))


def test_result_fields_are_consistent():
    x, _ = blobs(3, 1000)
    result = run_kmeans(x, 7, seed=0, niter=5)
    assert result.labels.dtype == np.int64 and result.labels.shape == (1000,)
    assert result.labels.min() >= 0 and result.labels.max() < 7
    np.testing.assert_array_equal(result.sizes, np.bincount(result.labels, minlength=7))
    # the objective is that of the labels returned, to their centroids
    assert result.objective >= within_cluster_sum(x, result.labels) * (1 - 1e-5)
    assert result.backend == "faiss-cpu"


def test_empty_clusters_are_counted_and_reseeds_reported():
    # 4 distinct points, 12 centroids: at most 4 clusters can be non-empty
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8)).astype(np.float32)[rng.integers(0, 4, 400)]
    result = run_kmeans(x, 12, seed=0, niter=10)
    assert result.sizes.sum() == 400 and result.sizes.shape == (12,)
    assert result.n_empty == int((result.sizes == 0).sum()) >= 8
    assert result.n_reseeded > 0


def test_no_subsampling_uses_every_point():
    # N > 256 * k: FAISS would train on a k * 256 sample by default. Converged on every point,
    # the centroids are the means of their clusters, so the objective is the least the labels
    # allow; centroids fitted to a sample are the means of the sample only.
    x, _ = blobs(4, 3000)
    full = run_kmeans(x, 4, seed=0, niter=20)
    assert full.objective == pytest.approx(within_cluster_sum(x, full.labels), rel=1e-5)
    sampled = run_kmeans(x, 4, seed=0, niter=20, max_points_per_centroid=20)
    assert sampled.objective > (1 + 1e-3) * within_cluster_sum(x, sampled.labels)  # ~5% here


def test_bad_input_is_rejected():
    x, _ = blobs(2, 50)
    with pytest.raises(ValueError, match="k=51 for 50 points"):
        run_kmeans(x, 51, seed=0)
    x[7, 3] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        run_kmeans(x, 2, seed=0)
    with pytest.raises(ValueError, match="device"):
        resolve_gpus("tpu")


def test_gpu_request_without_gpu_is_an_error():
    if resolve_gpus("auto"):
        pytest.skip("a GPU is available here")
    with pytest.raises(RuntimeError, match="'gpu' was requested"):
        run_kmeans(blobs(2, 50)[0], 2, seed=0, device="gpu")


def test_gpu_index_selection_mocked(monkeypatch, caplog):
    """With a (mocked) 2-GPU faiss build, 'auto' clones the flat index to all GPUs as replicas
    with exact float32 distances; the clone here is the CPU index, so the run still works."""
    calls = []

    def fake_cpu_to_all_gpus(index, co=None, ngpu=-1):
        calls.append(SimpleNamespace(co=co, ngpu=ngpu, metric=index.metric_type))
        return index

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", SimpleNamespace, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", fake_cpu_to_all_gpus, raising=False)
    x, truth = blobs(2, 500)
    with caplog.at_level(logging.DEBUG, logger="dcluster.clustering"):
        result = run_kmeans(x, 2, seed=0, device="auto", node_gpus=True)
    assert result.backend == "faiss-gpu x2 (replicated)"
    assert "faiss-gpu x2" in caplog.text
    (call,) = calls
    assert call.ngpu == 2 and call.metric == faiss.METRIC_L2
    assert call.co.shard is False and call.co.useFloat16 is False
    assert nmi(result.labels, truth) > 0.99
    calls.clear()
    assert run_kmeans(x, 2, seed=0, device="cpu").backend == "faiss-cpu" and not calls


def test_kmeans_labels_helper_matches_run_kmeans():
    x, _ = blobs(3, 600)
    np.testing.assert_array_equal(kmeans_labels(x, 3, seed=5, niter=7, device="cpu"),
                                  run_kmeans(x, 3, seed=5, niter=7, device="cpu").labels)


def test_a_chosen_backend_is_used_as_it_is_without_detecting_the_machine(monkeypatch):
    """A run resolves its backend once (DeepCluster.__init__) and passes the Backend down:
    run_kmeans then neither detects the hardware nor checks FAISS's build again, and clusters
    as it does from the config's strings."""
    import dcluster.clustering.kmeans as kmeans

    x, _ = blobs(3, 600)
    chosen = kmeans.machine_backend("torch", "cpu")
    from_strings = run_kmeans(x, 3, seed=5, niter=7, device="cpu", backend="torch")
    monkeypatch.setattr(kmeans, "detect", lambda: pytest.fail("the machine detected again"))
    result = run_kmeans(x, 3, seed=5, niter=7, backend=chosen)
    assert result.backend == from_strings.backend
    np.testing.assert_array_equal(result.labels, from_strings.labels)
