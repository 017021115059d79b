"""The top-k eigensolver of the PCA fit against a full eigh: same subspace and variance on
spectra with a gap and with near-ties at the cut-off, and eigh itself when it cannot converge."""
import pytest
import torch

from dcluster.clustering.eigen import TOLERANCE, full_eigh, top_eigenpairs

D, K = 600, 40


def covariance(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix with the given spectrum in random orthonormal directions."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen,
                                    dtype=torch.float64)).Q
    return (q * eigenvalues) @ q.T


def power_law(alpha: float = 1.0) -> torch.Tensor:
    return torch.arange(1, D + 1, dtype=torch.float64).pow(-alpha)


def captured(cov: torch.Tensor, vectors: torch.Tensor) -> float:
    return float(torch.einsum("ij,ij->", vectors, cov @ vectors))


def largest_angle_sine(a: torch.Tensor, b: torch.Tensor) -> float:
    cosines = torch.linalg.svdvals(a.T @ b)
    return float((1.0 - cosines.min().clamp(max=1.0) ** 2).sqrt())


def test_gapped_spectrum_gives_eighs_subspace_and_eigenvalues():
    values = power_law()
    values[K:] *= 0.1  # a clear gap after the K wanted directions
    cov = covariance(values)
    exact, ours = full_eigh(cov, K, "reference"), top_eigenpairs(cov, K)
    assert ours.solver.startswith("subspace iteration")
    # Davis-Kahan: residuals below TOLERANCE * lambda bound the angle by residual / gap
    gap = float(values[K - 1] - values[K])
    assert largest_angle_sine(ours.vectors, exact.vectors) < TOLERANCE * float(values[K - 1]) / gap
    assert captured(cov, ours.vectors) >= 0.99999 * captured(cov, exact.vectors)
    torch.testing.assert_close(ours.values, exact.values, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(ours.vectors.T @ ours.vectors, torch.eye(K, dtype=torch.float64))


def test_near_ties_at_the_cut_off_keep_the_captured_variance():
    """Eigenvalues K-1 .. K+1 within 1e-6 of each other: which of the tied directions lands
    inside the subspace is arbitrary, so the subspace is compared by its variance."""
    values = power_law()
    values[K - 2:K + 2] = values[K - 2] * (1.0 - 1e-6 * torch.arange(4, dtype=torch.float64))
    cov = covariance(values, seed=1)
    exact, ours = full_eigh(cov, K, "reference"), top_eigenpairs(cov, K)
    assert ours.solver.startswith("subspace iteration")
    assert captured(cov, ours.vectors) >= 0.9999 * captured(cov, exact.vectors)
    # the directions before the tie are determined, and found (Davis-Kahan, as above)
    gap = float(values[K - 4] - values[K - 3])
    assert (largest_angle_sine(ours.vectors[:, :K - 3], exact.vectors[:, :K - 3])
            < TOLERANCE * float(values[K - 4]) / gap)


def test_no_convergence_falls_back_to_eigh():
    """A flat spectrum far beyond the block: the block barely improves, so the solver gives
    up after its iterations and returns eigh's pairs."""
    values = torch.linspace(1.0, 0.9, D, dtype=torch.float64)
    cov = covariance(values, seed=2)
    ours = top_eigenpairs(cov, K, max_iterations=8)
    exact = full_eigh(cov, K, "reference")
    assert ours.solver.startswith("eigh (fallback")
    torch.testing.assert_close(ours.values, exact.values)
    assert torch.equal(ours.vectors, exact.vectors)


def test_same_seed_same_pairs():
    cov = covariance(power_law(), seed=3)
    a, b = top_eigenpairs(cov, K, seed=5), top_eigenpairs(cov, K, seed=5)
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("k", [D // 2, D])
def test_a_block_of_most_of_the_space_uses_eigh(k):
    ours = top_eigenpairs(covariance(power_law(), seed=4), k)
    assert ours.solver.startswith("eigh") and ours.vectors.shape == (D, k)


def test_small_dimensions_take_eigh_directly():
    """256-d features at 64 components: the spectrum beyond the block is too flat for the
    iteration, and eigh of 256 x 256 is cheap, so it is used without trying."""
    cov = covariance(power_law()[:256].sqrt(), seed=2)  # flat: lambda_i ~ i^-1/2
    ours = top_eigenpairs(cov, 64)
    assert ours.solver == "eigh (256 dimensions)"
    torch.testing.assert_close(ours.values, full_eigh(cov, 64, "reference").values)


def test_the_cpu_subset_solver_gives_torch_eighs_leading_pairs():
    """full_eigh on the CPU asks LAPACK for the k leading pairs only (syevr, less memory than
    torch's syevd at D = 4096): the same eigenvalues, and the same vectors up to sign."""
    cov = covariance(power_law(), seed=7)
    ours = full_eigh(cov, K, "test")
    values, vectors = torch.linalg.eigh(cov)
    torch.testing.assert_close(ours.values, values.flip(0)[:K], rtol=1e-10, atol=1e-12)
    alignment = (ours.vectors * vectors.flip(1)[:, :K]).sum(dim=0).abs()
    torch.testing.assert_close(alignment, torch.ones(K, dtype=torch.float64), rtol=0, atol=1e-8)
    assert ours.vectors.shape == (D, K) and ours.solver == "eigh (test)"
