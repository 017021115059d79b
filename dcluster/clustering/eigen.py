"""The leading eigenpairs of a covariance matrix, without a full eigendecomposition.

Why: PCA keeps 256 of 4096 directions, yet a float64 ``torch.linalg.eigh`` of the whole
4096 x 4096 covariance computes all of them, and was 85% of the PCA fit on the 2-core
machines. Block subspace iteration needs only products of the covariance with a thin block
(GEMMs, fast on CPUs and GPUs alike), and stops as soon as the wanted pairs have converged.

The block is wider than the number of pairs wanted (``oversample`` extra columns): the error
of pair i then shrinks each iteration by about lambda_(block + 1) / lambda_i rather than by
lambda_(k + 1) / lambda_k, so near-ties at the cut-off k do not slow it down; only a
spectrum that is flat far beyond k does, and then the solver falls back to ``eigh``. The
products and the convergence test run in float32 (the subspace needs no more), a last
iteration and the Rayleigh-Ritz step in float64.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import scipy.linalg
import torch

log = logging.getLogger(__name__)

TOLERANCE = 1e-3
"""Converged when every wanted Ritz pair's residual ||C v - theta v|| is below this fraction of
its own eigenvalue theta: the whitening scales direction i by 1/sqrt(lambda_i), so small
eigenvalues need the same relative accuracy as large ones. At 1e-3 the subspace captured
0.99999 or more of the exact top-k variance on power-law spectra (tests/test_eigen.py and
benchmarks/bench_clustering.py measure it)."""

TEST_FLOOR = 1e-4
"""Eigenvalues below this fraction of the largest are held to the accuracy of one at the
fraction: the test's float32 products resolve residuals down to ~1e-7 of the largest
eigenvalue only (and the whitening floors eigenvalues at 1e-5 of it anyway)."""

EIGH_MAX_DIM = 512
"""Up to this many dimensions a full ``eigh`` takes tens of milliseconds, and the features
of small networks (a 256-d smallconv at pca_dim 64) have spectra too flat beyond the block
for the iteration to converge in MAX_ITERATIONS: it would end in the eigh anyway."""

MAX_ITERATIONS = 60
CHECK_EVERY = 2
"""Iterations between convergence tests (a test reuses the iteration's product, and costs a
small eigh and a few thin GEMMs)."""


@dataclass
class Eigenpairs:
    values: torch.Tensor  # float64 (k,), descending
    vectors: torch.Tensor  # float64 (D, k), orthonormal columns
    solver: str  # "subspace iteration (n iterations)" or "eigh" (with the reason)


def full_eigh(cov: torch.Tensor, k: int, why: str) -> Eigenpairs:
    """The k leading pairs from a direct eigensolver, on ``cov``'s device.

    On the CPU, LAPACK's ``syevr`` asked for those k pairs only (``scipy.linalg.eigh`` with
    ``subset_by_index``; scipy's docs: the "evr" driver computes a subset by index): for
    the k = 256 leading pairs of a 4096 x 4096 covariance it took 4.2 s and 147 MB (one copy
    of the matrix) on the 2-core machines, where ``torch.linalg.eigh`` (``syevd``, every
    pair, with a 2 D^2 workspace) took 10.3 s and 435 MB, at rank 0's memory peak. On a GPU,
    ``torch.linalg.eigh`` (cuSOLVER)."""
    if cov.device.type == "cpu":
        dim = cov.shape[0]
        values, vectors = scipy.linalg.eigh(cov.numpy(), subset_by_index=[dim - k, dim - 1],
                                            driver="evr", check_finite=False)
        values, vectors = torch.from_numpy(values), torch.from_numpy(vectors)
    else:
        values, vectors = torch.linalg.eigh(cov)
    return Eigenpairs(values.flip(0)[:k], vectors.flip(1)[:, :k], f"eigh ({why})")


def top_eigenpairs(cov: torch.Tensor, k: int, *, seed: int = 0,
                   oversample: Optional[int] = None, tol: float = TOLERANCE,
                   max_iterations: int = MAX_ITERATIONS) -> Eigenpairs:
    """The ``k`` largest eigenvalues and their eigenvectors of the symmetric float64 ``cov``,
    on its device. Deterministic for a given ``seed`` (the random start block)."""
    dim = cov.shape[0]
    if dim <= EIGH_MAX_DIM:
        return full_eigh(cov, k, f"{dim} dimensions")
    block = min(dim, k + (oversample if oversample is not None else max(k // 2, 16)))
    if 2 * block >= dim:  # the block is most of the space: eigh is as cheap
        return full_eigh(cov, k, f"block of {block} of {dim} dimensions")
    gen = torch.Generator(device=cov.device).manual_seed(seed)
    cov32 = cov.float()
    q = orthonormal(torch.randn(dim, block, generator=gen, device=cov.device))
    for iteration in range(1, max_iterations + 1):
        cq = cov32 @ q
        if iteration % CHECK_EVERY == 0 and _converged(q, cq, k, tol):
            # the test ran on float32 products: one more step in float64 lifts the basis
            # above float32 rounding before the float64 Rayleigh-Ritz step
            pairs = rayleigh_ritz(cov, orthonormal(cov @ q.double()), k)
            pairs.solver = f"subspace iteration ({iteration} iterations)"
            return pairs
        q = orthonormal(cq)
    del cov32, q, cq  # the fallback's own copy of cov takes their place at the memory peak
    log.info("subspace iteration did not converge in %d iterations (flat spectrum beyond "
             "%d dimensions?): falling back to a full eigh", max_iterations, block)
    return full_eigh(cov, k, f"fallback: no convergence in {max_iterations} iterations")


def orthonormal(z: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``z``, in its dtype: Cholesky QR on a float64
    Gram matrix (GEMMs: several times faster than Householder QR on a tall block, and exact
    enough for the condition numbers a subspace iteration produces), Householder QR when the
    Gram matrix is not positive definite."""
    z64 = z.double()
    chol, info = torch.linalg.cholesky_ex(z64.T @ z64)
    if int(info) != 0:
        return torch.linalg.qr(z).Q
    return torch.linalg.solve_triangular(chol, z64.T, upper=False).T.to(z.dtype)


def rayleigh_ritz(cov: torch.Tensor, q: torch.Tensor, k: int) -> Eigenpairs:
    """The k leading Ritz pairs of ``cov`` on the span of the orthonormal ``q``."""
    theta, w = torch.linalg.eigh(q.T @ (cov @ q))
    return Eigenpairs(theta.flip(0)[:k], q @ w.flip(1)[:, :k], "")


def _converged(q: torch.Tensor, cq: torch.Tensor, k: int, tol: float) -> bool:
    """Whether the k leading Ritz pairs on span(q), from the product ``cq`` = cov @ q, all
    have a relative residual ||cov v - theta v|| / theta of at most ``tol``."""
    theta, w = torch.linalg.eigh(q.T @ cq)
    theta, w = theta.flip(0)[:k], w.flip(1)[:, :k]
    residual = torch.linalg.vector_norm(cq @ w - (q @ w) * theta, dim=0)
    # directions below the whitening's floor are scaled as if at the floor (fit_whitening),
    # and float32 products cannot resolve residuals below ~1e-7 of the largest eigenvalue
    floor = TEST_FLOOR * float(theta[0])
    return bool((residual <= tol * theta.clamp(min=floor)).all())
