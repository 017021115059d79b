"""PCA whitening fitted from streamed second-moment statistics.

Why not ``faiss.PCAMatrix``: it needs all rows in one array and took 118 s to train on
50k x 4096 on the 2-core machines, while a GEMM covariance plus ``torch.linalg.eigh`` takes a
fraction of that. Why statistics rather than a fit on an array: in a distributed run each rank
holds only its own features; (count, sum, sum of outer products) add up across ranks, so a
single all-reduce gives every rank the global fit without moving any feature.

Memory stays at one chunk of the D-dimensional input plus the N x dim output: inputs are read
in row chunks, never copied whole.

Devices: every computation runs on the device of the tensors it is given (the statistics'
``device``, the transform's projection), with the same code on a GPU as on the CPU; only the
reduced N x dim output is written to host memory, which is where FAISS and the collectives
take it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
import torch

from dcluster.clustering.eigen import top_eigenpairs

log = logging.getLogger(__name__)

Features = Union[np.ndarray, torch.Tensor]

CHUNK_ROWS = 8192
"""Rows per GEMM. Large enough for full BLAS speed, small enough that the float32 sums inside
one chunk stay accurate before they are added to the float64 totals."""

_BLOCK_COLS = 512
"""Width of the column blocks of the covariance: computing only the blocks on and above the
diagonal halves (asymptotically) the GEMM work, since the matrix is symmetric."""


def as_rows(features: Features) -> torch.Tensor:
    """A 2-D torch view of ``features`` (no copy for numpy arrays or tensors)."""
    x = torch.from_numpy(features) if isinstance(features, np.ndarray) else features
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"features must be a numpy array or torch tensor, got {type(features)}")
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.is_complex() or not x.is_floating_point():
        raise ValueError(f"features must be real floating point, got dtype {x.dtype}")
    return x


def _chunks(x: torch.Tensor, device: torch.device, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 chunk on ``device``); a no-copy view when x already is float32 there."""
    for lo in range(0, x.shape[0], rows):
        yield lo, x[lo:lo + rows].to(device=device, dtype=torch.float32)


def _raise_non_finite(chunk: torch.Tensor, first_row: int) -> None:
    bad = int((~torch.isfinite(chunk)).sum())
    rows = torch.nonzero(~torch.isfinite(chunk).all(dim=1)).flatten()
    raise ValueError(
        f"features contain {bad} non-finite values (NaN or inf) in {rows.numel()} rows, "
        f"the first at row {first_row + int(rows[0])}"
    )


SUM_ROWS = 256
"""Rows summed at a time by :func:`column_sums`."""


def column_sums(x: torch.Tensor) -> torch.Tensor:
    """The float64 sums of the columns of ``x``, SUM_ROWS rows at a time: torch's
    ``sum(dtype=float64)`` first casts its whole input, a float64 copy twice the size of a
    PCA chunk (64 MB at 2048 x 4096) at rank 0's memory peak."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for lo in range(0, x.shape[0], SUM_ROWS):
        total += x[lo:lo + SUM_ROWS].sum(dim=0, dtype=torch.float64)
    return total


class PCAStats:
    """Running count, sum and sum of outer products of ``x - shift``, in float64.

    The products are taken of shifted rows because features such as ReLU outputs have a mean
    far from zero: the covariance ``E[xx^T] - mu mu^T`` would then lose most float32 digits to
    cancellation. Any shift close to the mean avoids that; by default the mean of the first
    batch is used. Each chunk's products are computed in float32 (several times the GEMM speed
    of float64 on CPUs) and accumulated in float64.

    Distributed use: give every rank the same ``shift`` (e.g. broadcast from rank 0), call
    :meth:`update` on the local features, then all-reduce (sum) ``count``, ``sum`` and ``outer``.
    Only the upper triangle of ``outer`` (diagonal included) is meaningful: the matrix is
    symmetric, so the blocks below the diagonal are never computed.
    """

    def __init__(self, dim: int, shift: Optional[Features] = None,
                 device: Union[str, torch.device] = "cpu") -> None:
        if dim <= 0:
            raise ValueError(f"feature dimension must be positive, got {dim}")
        self.dim = dim
        self.device = torch.device(device)
        self.shift: Optional[torch.Tensor] = None
        if shift is not None:
            self.shift = torch.as_tensor(shift).to(self.device, torch.float32).reshape(dim)
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.outer: Optional[torch.Tensor] = torch.zeros(dim, dim, dtype=torch.float64,
                                                         device=self.device)

    def update(self, batch: Features, chunk_rows: int = CHUNK_ROWS) -> "PCAStats":
        """Add the rows of ``batch``. Each call adds one D x D float64 triangle per chunk,
        so feed thousands of rows at a time rather than single mini-batches."""
        x = as_rows(batch)
        if x.shape[1] != self.dim:
            raise ValueError(f"batch has {x.shape[1]} columns, the statistics have {self.dim}")
        outer = self._outer_or_raise()  # before any work on the rows
        if x.shape[0] == 0:
            return self
        buf = torch.empty(min(x.shape[0], chunk_rows), self.dim, device=self.device)
        for lo, chunk in _chunks(x, self.device, chunk_rows):
            if self.shift is None:
                self.shift = (column_sums(chunk) / chunk.shape[0]).float()
            centred = torch.sub(chunk, self.shift, out=buf[: chunk.shape[0]])
            chunk_sum = column_sums(centred)
            if not bool(torch.isfinite(chunk_sum).all()):  # NaN/inf propagate into the sum
                _raise_non_finite(chunk, self.count)
            self._add_upper_products(outer, centred)
            self.sum += chunk_sum
            self.count += chunk.shape[0]
        return self

    def _add_upper_products(self, outer: torch.Tensor, c: torch.Tensor) -> None:
        for lo in range(0, self.dim, _BLOCK_COLS):
            hi = min(lo + _BLOCK_COLS, self.dim)
            outer[lo:hi, lo:] += c[:, lo:hi].T @ c[:, lo:]

    def mean(self) -> torch.Tensor:
        """The float64 mean of all rows seen."""
        return self.shift.double() + self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """The float64 covariance, normalised by the count (not count - 1) so that whitened
        fitting data has exactly the identity as its (population) covariance.

        It spends the statistics: the covariance is built in their own D x D array (mirroring
        the upper triangle one column block at a time), because a second such array is
        134 MB at D = 4096, on rank 0 at the stage's peak."""
        outer = self._outer_or_raise()
        for lo in range(0, self.dim, _BLOCK_COLS):
            hi = min(lo + _BLOCK_COLS, self.dim)
            outer[hi:, lo:hi] = outer[lo:hi, hi:].T.clone()  # blocks on the diagonal are full
        self.outer = None
        m = self.sum / self.count
        return outer.div_(self.count).addr_(m, m, alpha=-1.0)

    def _outer_or_raise(self) -> torch.Tensor:
        if self.outer is None:
            raise RuntimeError("these PCA statistics were spent by covariance(): build new ones")
        return self.outer


@dataclass
class PCATransform:
    """``x -> (x - mean) @ projection``; the columns of ``projection`` are the leading
    eigenvectors, scaled by 1/sqrt(eigenvalue) when whitening."""

    mean: torch.Tensor  # float32 (D,)
    projection: torch.Tensor  # float32 (D, dim)
    eigenvalues: torch.Tensor  # float64 (dim,), descending
    whitened: bool
    solver: str = ""  # which eigensolver found the projection (see eigen.py)

    def to(self, device: Union[str, torch.device]) -> "PCATransform":
        """The same transform with its tensors on ``device``."""
        return PCATransform(self.mean.to(device), self.projection.to(device),
                            self.eigenvalues.to(device), self.whitened, self.solver)

    @property
    def dim(self) -> int:
        return self.projection.shape[1]

    def apply(self, features: Features, chunk_rows: int = CHUNK_ROWS,
              out: Optional[np.ndarray] = None, normalize: bool = False) -> np.ndarray:
        """Project (and whiten) into a new float32 (N, dim) host array, one input chunk at a
        time on the projection's device, or into ``out`` (C-contiguous float32 (N, dim)): rank
        0 of a distributed run writes its own rows straight into the block of the matrix it
        gathers, saving a copy. ``normalize`` scales each output row to unit L2 norm on the
        device, before the chunk leaves it (see :func:`l2_normalize`).

        The mean is subtracted before the product, not folded into a bias: with whitening the
        projection has large entries, and ``x @ P - mean @ P`` would cancel float32 digits."""
        x = as_rows(features)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features have {x.shape[1]} columns, the PCA was fitted on "
                             f"{self.mean.shape[0]}")
        if out is None:
            out = np.empty((x.shape[0], self.dim), dtype=np.float32)
        elif (out.shape != (x.shape[0], self.dim) or out.dtype != np.float32
              or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous float32 array of shape "
                             f"{(x.shape[0], self.dim)}, got {out.dtype} {out.shape}")
        out_t = torch.from_numpy(out)
        on_cpu = self.projection.device.type == "cpu"
        buf = torch.empty(min(x.shape[0], chunk_rows), x.shape[1], device=self.projection.device)
        for lo, chunk in _chunks(x, self.projection.device, chunk_rows):
            centred = torch.sub(chunk, self.mean, out=buf[: chunk.shape[0]])
            block = out_t[lo:lo + chunk.shape[0]]
            # on the CPU the product lands in place; elsewhere it is copied out once
            reduced = torch.matmul(centred, self.projection, out=block) if on_cpu else (
                centred @ self.projection)
            if normalize:
                _normalize_rows(reduced)
            if not on_cpu:
                block.copy_(reduced)
        return out


def _normalize_rows(t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of ``t`` scaled to unit L2 norm, in place (see :func:`l2_normalize`)."""
    return t.div_(torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min_(eps))


def fit_whitening(stats: PCAStats, dim: int, whiten: bool = True,
                  eps: float = 1e-5) -> PCATransform:
    """Fit the PCA (optionally whitening) to ``stats``, which it spends (see
    :meth:`PCAStats.covariance`).

    ``eps`` is relative: eigenvalues below ``eps * largest`` are floored there before the
    1/sqrt scaling. Such directions carry only rounding noise (float32 chunk products are
    accurate to about 1e-6 of the largest eigenvalue), and scaling them up to unit variance
    would let that noise dominate the L2-normalised vectors.

    The leading ``dim`` eigenpairs come from :func:`dcluster.clustering.eigen.top_eigenpairs`
    (subspace iteration, falling back to a full ``eigh``), on the statistics' device.
    Eigenvectors are signed so that each one's largest-magnitude entry is positive, which makes
    the transform a deterministic function of the statistics (eigensolvers' signs are
    arbitrary).
    """
    if stats.count < 2:
        raise ValueError(f"PCA needs at least 2 rows, got {stats.count}")
    if not 1 <= dim <= stats.dim:
        raise ValueError(f"PCA output dimension must be in [1, {stats.dim}], got {dim}")
    pairs = top_eigenpairs(stats.covariance(), dim)
    values, vectors = pairs.values, pairs.vectors
    peak = vectors.abs().argmax(dim=0)
    vectors = vectors * torch.sign(vectors[peak, torch.arange(dim, device=vectors.device)])
    projection = vectors
    if whiten:
        if not float(values[0]) > 0.0:
            raise ValueError("cannot whiten: the features have zero variance (all rows equal)")
        projection = vectors / values.clamp(min=eps * float(values[0])).sqrt()
    log.debug("PCA %d -> %d on %d rows (%s, %s): eigenvalues %.3g .. %.3g", stats.dim, dim,
              stats.count, stats.device, pairs.solver, float(values[0]), float(values[-1]))
    return PCATransform(mean=stats.mean().float(), projection=projection.float().contiguous(),
                        eigenvalues=values, whitened=whiten, solver=pairs.solver)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale the rows of the float32 array ``x`` to unit L2 norm, in place (rows of norm below
    ``eps`` are divided by ``eps``, so all-zero rows stay zero instead of becoming NaN)."""
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError(f"l2_normalize needs a C-contiguous float32 (N, d) array, got "
                         f"{x.dtype} of shape {x.shape}")
    _normalize_rows(torch.from_numpy(x), eps)
    return x
