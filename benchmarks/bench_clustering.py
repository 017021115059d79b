"""Cost of the clustering stage against bare FAISS k-means, and of our PCA against faiss's.

What each timed side includes:

* stage: ``dcluster.clustering.distributed_stage.cluster_shards`` in one process on the raw
  (N, D) features, as the training loop calls it: PCA statistics over all rows,
  eigendecomposition, projection + whitening, L2 normalisation, k-means on every point (no
  subsampling) and the final assignment of every point, plus the result bookkeeping (sizes,
  empty clusters). This is what an epoch pays. Its two halves are timed apart: the reduction
  (``fit_shared_transform`` + ``reduce_rows``) and ``cluster_reduced`` on its output.
* bare k-means: ``faiss.Kmeans`` on the same 256-d reduced vectors, same k, niter, seed and no
  subsampling, training plus the final ``index.search`` that produces the labels. This is the
  floor no preprocessing can go below.
* PCA fit: our streamed statistics + ``torch.linalg.eigh`` (not the projection of the data)
  against ``faiss.PCAMatrix(D, 256, -0.5).train`` on the same matrix. The subspaces they find
  are compared by their largest principal angle and the RMS sine of all principal angles; as
  the two can disagree because either is inaccurate, each subspace's share of the variance
  (under our float64-accumulated covariance) is reported too: the exact top-256 subspace
  captures the most.

The synthetic features have a mean far from zero (like ReLU outputs), cluster structure and a
decaying spectrum whose first 256 directions dominate, so the top-256 subspace is well defined.

The table goes to stdout; the last line is one JSON object with the numbers. Run with dcluster
installed (``make bench``) or as ``PYTHONPATH=. python benchmarks/bench_clustering.py``.
Timings are only meaningful on an otherwise idle machine: the load average is printed too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import faiss
import numpy as np
import torch

from dcluster.clustering import cluster_reduced
from dcluster.clustering.distributed_stage import (cluster_shards, fit_shared_transform,
                                                   reduce_rows, row_layout)
from dcluster.clustering.pca import PCAStats, fit_whitening, l2_normalize
from dcluster.collectives import Comm
from dcluster.config import ClusteringConfig
from dcluster.distributed import Env

PCA_DIM = 256
CPU = torch.device("cpu")
SOLO = Comm(Env(rank=0, world_size=1, local_rank=0, device=CPU))


def synthetic_features(n: int, dim: int, n_classes: int, seed: int) -> np.ndarray:
    """Cluster centres in a 256-d latent space with decaying scales, mapped to ``dim``
    dimensions, plus isotropic noise and a positive offset."""
    gen = torch.Generator().manual_seed(seed)
    latent = min(PCA_DIM, dim)
    scales = torch.logspace(0, -1.5, latent)
    centres = torch.randn(n_classes, latent, generator=gen) * scales
    mixing = torch.randn(latent, dim, generator=gen) / math.sqrt(latent)
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    z = centres[labels] + 0.5 * torch.randn(n, latent, generator=gen) * scales
    x = z @ mixing
    x.add_(torch.randn(n, dim, generator=gen), alpha=0.01).add_(1.0)
    return x.numpy()


def timed(fn, *args, repeat: int = 1):
    """(result of the last call, fastest wall time of ``repeat`` calls): the minimum is the
    least disturbed by other processes on a shared machine."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return out, best


def warm_up() -> None:
    """First calls into MKL/OpenMP/FAISS pay one-off start-up costs that are not the method's."""
    a = torch.randn(512, 512, dtype=torch.float64)
    torch.linalg.eigh(a @ a.T)
    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    faiss.Kmeans(16, 8, niter=2).train(x)


def stage(x: np.ndarray, cfg: ClusteringConfig, seed: int) -> None:
    """The epoch's clustering stage on one process, every image with a feature row."""
    cluster_shards(x, np.arange(len(x)), len(x), cfg, SOLO, seed, CPU)


def reduce(x: np.ndarray, cfg: ClusteringConfig) -> np.ndarray:
    """The stage's first half: its PCA fit, projection + whitening and L2 normalisation."""
    return reduce_rows(x, fit_shared_transform(x, row_layout(x, SOLO), cfg, SOLO), cfg)


def bare_kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False,
                      max_points_per_centroid=-(-x.shape[0] // k), min_points_per_centroid=1)
    km.train(x)
    return km.index.search(x, 1)[1].ravel()


def orthonormal(basis: np.ndarray) -> np.ndarray:
    return np.linalg.qr(basis.astype(np.float64))[0]


def principal_angles(qa: np.ndarray, qb: np.ndarray) -> tuple[float, float]:
    """(largest principal angle in degrees, RMS sine of all angles) between two spans."""
    cosines = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0.0, 1.0)
    sines = np.sqrt(1.0 - cosines**2)
    return float(np.degrees(np.arccos(cosines.min()))), float(np.sqrt((sines**2).mean()))


def captured_variance(cov: np.ndarray, q: np.ndarray) -> float:
    return float(np.einsum("ij,ij->", q, cov @ q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="time the stage, its halves, bare k-means and our PCA this many "
                             "times, keep the fastest (faiss's PCA runs once)")
    parser.add_argument("--quick", action="store_true", help="20k x 1024, k=200 (seconds)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.dim, args.k = 20_000, 1024, 200

    x = synthetic_features(args.n, args.dim, n_classes=max(args.k // 4, 2), seed=args.seed)
    warm_up()
    cfg = ClusteringConfig(k=args.k, pca_dim=PCA_DIM, niter=args.niter, device="cpu")
    r = args.repeat
    _, stage_s = timed(stage, x, cfg, args.seed, repeat=r)
    reduced, reduce_s = timed(reduce, x, cfg, repeat=r)
    _, cluster_s = timed(cluster_reduced, reduced, cfg, args.seed, repeat=r)
    _, bare_s = timed(bare_kmeans, reduced, args.k, args.niter, args.seed, repeat=r)

    stats, stats_s = timed(lambda: PCAStats(args.dim).update(x), repeat=r)
    transform, eigh_s = timed(fit_whitening, stats, PCA_DIM, True, repeat=r)
    reduced, apply_s = timed(transform.apply, x, repeat=r)
    _, l2_s = timed(l2_normalize, reduced)
    faiss_pca = faiss.PCAMatrix(args.dim, PCA_DIM, -0.5)  # eigen_power is positional only
    _, faiss_s = timed(faiss_pca.train, x)
    ours = orthonormal(transform.projection.numpy())
    theirs = orthonormal(faiss.vector_to_array(faiss_pca.A).reshape(PCA_DIM, args.dim).T)
    angle, rms_sine = principal_angles(ours, theirs)
    cov = stats.covariance().numpy()
    variance_ratio = captured_variance(cov, theirs) / captured_variance(cov, ours)

    fit_s = stats_s + eigh_s
    rows = [
        ("stage (cluster_shards)", stage_s),
        ("  PCA + whiten + L2", reduce_s),
        ("  k-means + labels", cluster_s),
        ("bare faiss.Kmeans + labels", bare_s),
        ("our PCA fit", fit_s),
        ("  statistics (GEMM)", stats_s),
        ("  torch.linalg.eigh", eigh_s),
        ("projection + whitening", apply_s),
        ("L2 normalisation", l2_s),
        ("faiss.PCAMatrix train", faiss_s),
    ]
    print(f"N={args.n} D={args.dim} -> {PCA_DIM}, k={args.k}, niter={args.niter}, "
          f"torch threads={torch.get_num_threads()}, faiss threads={faiss.omp_get_max_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for name, seconds in rows:
        print(f"{name:32s} {seconds:9.2f} s")
    print(f"{'stage / bare k-means':32s} {stage_s / bare_s:9.2f} x")
    print(f"{'faiss PCA / our PCA fit':32s} {faiss_s / fit_s:9.2f} x")
    print(f"{'largest principal angle':32s} {angle:9.4f} deg")
    print(f"{'RMS sine of principal angles':32s} {rms_sine:9.2e}")
    print(f"{'faiss/our captured variance':32s} {variance_ratio:9.6f}")
    print(json.dumps({
        "n": args.n, "dim": args.dim, "k": args.k, "niter": args.niter, "repeat": r,
        "load_average": os.getloadavg()[0],
        "stage_over_bare_kmeans": stage_s / bare_s,
        "pca_speedup_vs_faiss": faiss_s / fit_s,
        "stage_seconds": stage_s,
        "stage_pca_seconds": reduce_s,
        "stage_cluster_seconds": cluster_s,
        "bare_kmeans_seconds": bare_s,
        "pca_fit_seconds": fit_s,
        "pca_stats_seconds": stats_s,
        "pca_eigh_seconds": eigh_s,
        "pca_apply_seconds": apply_s,
        "l2_seconds": l2_s,
        "faiss_pca_seconds": faiss_s,
        "subspace_max_angle_deg": angle,
        "subspace_rms_sine": rms_sine,
        "faiss_over_our_captured_variance": variance_ratio,
    }))


if __name__ == "__main__":
    main()
