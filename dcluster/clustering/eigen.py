"""The leading eigenpairs of a covariance matrix, without a full eigendecomposition.

Why: PCA keeps 256 of 4096 directions, yet a float64 ``torch.linalg.eigh`` of the whole
4096 x 4096 covariance computes all of them, and was 85% of the PCA fit on the 2-core
machines. Block subspace iteration needs only products of the covariance with a thin block
(GEMMs, fast on CPUs and GPUs alike), and stops as soon as the wanted pairs have converged.

The block is wider than the number of pairs wanted (``oversample`` extra columns): the error
of pair i then shrinks each iteration by about lambda_(block + 1) / lambda_i rather than by
lambda_(k + 1) / lambda_k, so near-ties at the cut-off k do not slow it down; only a
spectrum that is flat far beyond k does, and then the solver falls back to ``eigh``. The
products run in float32 (the subspace needs no more), the final Rayleigh-Ritz step and the
convergence test in float64, so the pairs returned are as accurate as the test says.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger(__name__)

TOLERANCE = 1e-3
"""Converged when every wanted Ritz pair's residual ||C v - theta v|| is below this fraction of
its own eigenvalue theta: the whitening scales direction i by 1/sqrt(lambda_i), so small
eigenvalues need the same relative accuracy as large ones. At 1e-3 the subspace captured
0.99999 or more of the exact top-k variance on power-law spectra (tests/test_eigen.py and
benchmarks/bench_clustering.py measure it)."""

RELATIVE_FLOOR = 1e-5
"""Eigenvalues below this fraction of the largest are floored there by the whitening (its
``eps``), so their directions are held to the accuracy of the floor only."""

MAX_ITERATIONS = 60
CHECK_EVERY = 4
"""Iterations between convergence tests: a test costs a float64 product with the block, about
twice an iteration, so testing every time would triple the cost."""


@dataclass
class Eigenpairs:
    values: torch.Tensor  # float64 (k,), descending
    vectors: torch.Tensor  # float64 (D, k), orthonormal columns
    solver: str  # "subspace iteration (n iterations)" or "eigh" (with the reason)


def full_eigh(cov: torch.Tensor, k: int, why: str) -> Eigenpairs:
    """The k leading pairs from a full ``torch.linalg.eigh``."""
    values, vectors = torch.linalg.eigh(cov)
    return Eigenpairs(values.flip(0)[:k], vectors.flip(1)[:, :k], f"eigh ({why})")


def top_eigenpairs(cov: torch.Tensor, k: int, *, seed: int = 0,
                   oversample: Optional[int] = None, tol: float = TOLERANCE,
                   max_iterations: int = MAX_ITERATIONS) -> Eigenpairs:
    """The ``k`` largest eigenvalues and their eigenvectors of the symmetric float64 ``cov``,
    on its device. Deterministic for a given ``seed`` (the random start block)."""
    dim = cov.shape[0]
    block = min(dim, k + (oversample if oversample is not None else max(k // 2, 16)))
    if 2 * block >= dim:  # the block is most of the space: eigh is as cheap
        return full_eigh(cov, k, f"block of {block} of {dim} dimensions")
    gen = torch.Generator(device=cov.device).manual_seed(seed)
    cov32 = cov.float()
    q = torch.linalg.qr(torch.randn(dim, block, generator=gen, device=cov.device)).Q
    for iteration in range(1, max_iterations + 1):
        q = torch.linalg.qr(cov32 @ q).Q
        if iteration % CHECK_EVERY and iteration != max_iterations:
            continue
        # re-orthonormalised in float64: float32's QR is orthonormal to 1e-7 only
        pairs = _rayleigh_ritz(cov, torch.linalg.qr(q.double()).Q, k, tol)
        if pairs is not None:
            pairs.solver = f"subspace iteration ({iteration} iterations)"
            return pairs
    log.info("subspace iteration did not converge in %d iterations (flat spectrum beyond "
             "%d dimensions?): falling back to a full eigh", max_iterations, block)
    return full_eigh(cov, k, f"fallback: no convergence in {max_iterations} iterations")


def _rayleigh_ritz(cov: torch.Tensor, q: torch.Tensor, k: int,
                   tol: float) -> Optional[Eigenpairs]:
    """The k leading Ritz pairs of ``cov`` on the span of ``q``, or None while any of them has
    a relative residual above ``tol``."""
    cq = cov @ q
    theta, w = torch.linalg.eigh(q.T @ cq)
    theta, w = theta.flip(0)[:k], w.flip(1)[:, :k]
    vectors = q @ w
    residual = torch.linalg.vector_norm(cq @ w - vectors * theta, dim=0)
    # directions below the whitening's floor are scaled as if at the floor (fit_whitening):
    # they need no more accuracy than that
    floor = RELATIVE_FLOOR * float(theta[0])
    if not bool((residual <= tol * theta.clamp(min=floor)).all()):
        return None
    return Eigenpairs(theta, vectors, "")
