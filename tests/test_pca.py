"""PCA whitening: identity covariance, the right subspace, and streaming/merging exactness."""
import faiss
import numpy as np
import pytest
import torch

from dcluster.clustering.pca import PCAStats, fit_whitening, l2_normalize

N, D, DIM = 3000, 80, 12


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    """Anisotropic data with a clear spectral gap after DIM directions and a large mean
    (like ReLU features), so centring errors and subspace ambiguity would both show."""
    rng = np.random.default_rng(0)
    scales = np.concatenate([np.linspace(10.0, 3.0, DIM), np.full(D - DIM, 0.5)])
    rotation, _ = np.linalg.qr(rng.standard_normal((D, D)))
    x = (rng.standard_normal((N, D)) * scales) @ rotation.T + 20.0
    return x.astype(np.float32)


def _projector(vectors: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(vectors)
    return q @ q.T


def test_whitened_covariance_is_identity(data):
    transform = fit_whitening(PCAStats(D).update(data), DIM, whiten=True)
    y = transform.apply(data)
    assert y.dtype == np.float32 and y.shape == (N, DIM)
    np.testing.assert_allclose(np.cov(y.T.astype(np.float64), bias=True), np.eye(DIM), atol=1e-4)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-4)


def test_subspace_and_eigenvalues_match_svd(data):
    x64 = data.astype(np.float64)
    centred = x64 - x64.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    transform = fit_whitening(PCAStats(D).update(data), DIM, whiten=False)
    projection = transform.projection.numpy().astype(np.float64)
    assert np.linalg.norm(_projector(projection) - _projector(vt[:DIM].T), 2) < 1e-5
    np.testing.assert_allclose(transform.eigenvalues.numpy(), s[:DIM] ** 2 / N, rtol=1e-5)
    np.testing.assert_allclose(projection.T @ projection, np.eye(DIM), atol=1e-5)
    assert (np.diff(transform.eigenvalues.numpy()) <= 0).all()


def test_matches_faiss_pcamatrix(data):
    reference = faiss.PCAMatrix(D, DIM, -0.5)  # eigen_power is positional-only in 1.15
    reference.train(data)
    # faiss's eigenvalues are those of the scatter matrix (covariance times N), so its
    # "whitened" output has variance 1/N: rescale it to unit variance
    expected = reference.apply(data) * np.sqrt(N)
    ours = fit_whitening(PCAStats(D).update(data), DIM, whiten=True).apply(data)
    signs = np.sign((ours * expected).sum(axis=0))  # eigenvector signs are arbitrary in faiss
    np.testing.assert_allclose(ours * signs, expected, atol=2e-3)


def test_sign_convention_is_deterministic(data):
    transform = fit_whitening(PCAStats(D).update(data), DIM, whiten=False)
    p = transform.projection.numpy()
    peak = np.abs(p).argmax(axis=0)
    assert (p[peak, np.arange(DIM)] > 0).all()
    flipped = fit_whitening(PCAStats(D).update(data[::-1].copy()), DIM, whiten=False)
    np.testing.assert_allclose(flipped.projection.numpy(), p, atol=1e-5)


def test_chunked_equals_one_shot(data):
    whole = PCAStats(D).update(data, chunk_rows=N)
    streamed = PCAStats(D)
    for part in np.array_split(data, 7):
        streamed.update(part, chunk_rows=97)
    assert streamed.count == whole.count == N
    np.testing.assert_allclose(streamed.mean().numpy(), whole.mean().numpy(), rtol=1e-6)
    np.testing.assert_allclose(streamed.covariance().numpy(), whole.covariance().numpy(),
                               rtol=1e-5, atol=1e-6)


def test_summing_tensors_with_a_common_shift_is_an_all_reduce(data):
    """What a distributed all-reduce does: add count, sum and outer of ranks sharing a shift."""
    shift = data[:10].mean(axis=0)
    whole = PCAStats(D, shift=shift).update(data)
    ranks = [PCAStats(D, shift=shift).update(part) for part in np.array_split(data, 3)]
    assert sum(r.count for r in ranks) == whole.count
    torch.testing.assert_close(sum(r.sum for r in ranks), whole.sum, rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(torch.triu(sum(r.outer for r in ranks)), torch.triu(whole.outer),
                               rtol=1e-6, atol=1e-3)


def test_torch_and_float64_inputs_give_the_same_transform(data):
    reference = fit_whitening(PCAStats(D).update(data), DIM).apply(data)
    as_tensor = torch.from_numpy(data.astype(np.float64))
    other = fit_whitening(PCAStats(D).update(as_tensor), DIM).apply(as_tensor)
    np.testing.assert_allclose(other, reference, atol=1e-4)


def test_non_finite_features_are_rejected(data):
    bad = data.copy()
    bad[1234, 5] = np.nan
    bad[1234, 6] = np.inf
    with pytest.raises(ValueError, match="2 non-finite values .* row 1234"):
        PCAStats(D).update(bad, chunk_rows=500)


def test_bad_dimensions_are_rejected(data):
    stats = PCAStats(D).update(data)
    with pytest.raises(ValueError, match="output dimension"):
        fit_whitening(stats, D + 1)
    with pytest.raises(ValueError, match="columns"):
        PCAStats(D + 1).update(data)


def test_the_covariance_spends_the_statistics(data):
    """covariance() builds the matrix in the statistics' own D x D array (no second one at
    rank 0's peak), so statistics that gave it refuse more rows instead of adding to it."""
    stats = PCAStats(D).update(data)
    reference = np.cov(data.astype(np.float64), rowvar=False, bias=True)
    np.testing.assert_allclose(stats.covariance().numpy(), reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="spent by covariance"):
        stats.update(data)


def test_l2_normalize_in_place():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    out = l2_normalize(x)
    assert out is x
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], rtol=1e-6)


def test_fit_on_a_device_argument_equals_the_cpu_fit(data):
    """The stage's device path (features as a tensor, statistics and projection on the
    tensor's device) is the same code as the host-array path: on the CPU both give the same
    transform and the same reduced rows, L2 normalisation included."""
    from dcluster.clustering.distributed_stage import fit_shared_transform, reduce_rows, row_layout
    from dcluster.parallel.collectives import Comm
    from dcluster.core.config import ClusteringConfig
    from dcluster.parallel.distributed import Env

    device = torch.device("cpu")
    comm = Comm(Env(0, 1, 0, device))
    cfg = ClusteringConfig(k=5, pca_dim=DIM, pca_sample=0)
    on_device = torch.from_numpy(data).to(device)
    host = fit_shared_transform(data, row_layout(data, comm), cfg, comm)
    dev = fit_shared_transform(on_device, row_layout(on_device, comm), cfg, comm)
    assert dev.projection.device == device
    torch.testing.assert_close(dev.projection, host.projection, rtol=0, atol=0)
    torch.testing.assert_close(dev.mean, host.mean, rtol=0, atol=0)
    reduced = reduce_rows(on_device, dev, cfg)
    np.testing.assert_array_equal(reduced, reduce_rows(data, host, cfg))
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, rtol=1e-5)
    # and the same as fitting the statistics directly, then normalising on the host
    direct = l2_normalize(fit_whitening(PCAStats(D).update(data), DIM).apply(data))
    np.testing.assert_allclose(reduced, direct, atol=1e-4)
