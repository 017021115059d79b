"""The epoch's clustering stage against bare FAISS k-means and against the original
DeepCluster stage, on the same features, measured in one run.

What each timed side includes:

* stage: ``dcluster.clustering.distributed_stage.cluster_shards`` in one process on the raw
  (N, D) features, held on ``--device`` as the feature pass leaves them: PCA statistics on
  ``clustering.pca_sample`` rows, the top-256 eigenpairs (subspace iteration), projection,
  whitening and L2 normalisation of every row, k-means on every point (no subsampling) and the
  final assignment, plus the result bookkeeping. This is what an epoch pays.
* bare k-means: ``faiss.Kmeans`` on the stage's own 256-d reduced vectors, same k, niter and
  seed, no subsampling, training plus the ``index.search`` that gives the labels: the floor
  no preprocessing can go below. Goal: stage <= 1.10 x bare k-means.
* engine: the k-means engine's Lloyd loop (``dcluster.clustering.engine.lloyd``) with the FAISS
  CPU backend against ``faiss.Clustering`` on the same reduced vectors, from the same initial
  centroids, for the same iterations, each with its final assignment
  (``engine_over_faiss_kmeans``, goal <= 1.05), and the PyTorch backend against the FAISS one
  on this device (``torch_backend_over_faiss``, informative on a CPU).
* with ``--device cuda``: one assignment pass of the PyTorch backend on the GPU, as a share of
  the GPU's float32 GEMM rate measured in the same run (``torch_assign_share_of_gemm``, goal
  >= 0.5), and FAISS's GPU flat index beside it where a FAISS GPU build is installed.
* original: the stage as the DeepCluster code does it: ``faiss.PCAMatrix(D, 256, -0.5)``
  trained on all rows, applied, ``faiss.normalize_L2``, ``faiss.Clustering`` with a flat L2
  index (on the GPUs with ``--device cuda``), and the search for the labels. Ours must be
  faster.

Every side builds what it needs inside its timer, from the same inputs: the stage and the
original from the raw features, the k-means sides from the stage's reduced vectors (and the
same initial centroids), each building its own index or assignment backend (the engine's
FAISS or PyTorch assigner: row norms, on a GPU the copy to the device) while timed. The
reduced vectors and the initial centroids they all start from are made once, untimed. The
sides take turns in ``--rounds`` rounds (3; the order reversed every other round), and each
side's best wall time and best CPU time count; the JSON's ``sides`` gives, for each side, those
times, the k-means iterations it ran (FAISS's ``iteration_stats``, the engine's per-iteration
DEBUG records; null for the PCA part) and the torch and FAISS (OpenMP) thread counts it ran
with.

Quality, untimed: the variance our PCA subspace captures under the covariance of all rows,
over that of the exact top-256 subspace of that covariance (``pca_captured_variance_vs_exact``;
1 is exact). ``--agreement`` also clusters the vectors of an all-rows fit with two seeds and
reports the NMI between the sampled fit's labels and the all-rows fit's, next to the NMI
between the two seeds (how much k-means itself varies): the evidence for ``pca_sample``.

The synthetic features have what CNN features have and isotropic noise has not: a power-law
spectrum over all D dimensions, cluster structure in the leading directions, and ReLU
non-negativity (a mean far from zero). The table goes to stdout; the last line is one JSON
object. Run with dcluster installed (``make bench``) or as ``PYTHONPATH=. python
benchmarks/bench_clustering.py``; ``--quick`` for a seconds-long check. Timings are only
meaningful on an otherwise idle machine: the load average is printed too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from dcluster.core.faiss_after_torch import faiss
from dcluster.clustering import cluster_reduced
from dcluster.clustering.assign import TorchAssign, faiss_cpu, faiss_gpus
from dcluster.clustering.distributed_stage import (cluster_shards, fit_shared_transform,
                                                   reduce_rows, row_layout)
from dcluster.clustering.engine import lloyd
from dcluster.clustering.kmeans import available_gpus, flat_l2_index
from dcluster.clustering.pca import PCAStats
from dcluster.parallel.collectives import Comm
from dcluster.core.config import ClusteringConfig
from dcluster.parallel.distributed import Env

PCA_DIM = 256
STRUCTURED_DIMS = 512
"""Leading latent directions that carry the cluster centres; the rest is power-law noise."""


def synthetic_features(n: int, dim: int, n_classes: int, seed: int,
                       alpha: float = 1.0) -> torch.Tensor:
    """ReLU(z @ M + b): latent z with variance i^-alpha along direction i (a power law over
    all ``dim`` directions), class centres in the first STRUCTURED_DIMS of them, mixed by a
    random matrix M."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.arange(1, dim + 1, dtype=torch.float32).pow(-alpha / 2)
    structured = min(STRUCTURED_DIMS, dim)
    centres = torch.randn(n_classes, structured, generator=gen) * scales[:structured]
    mixing = torch.randn(dim, dim, generator=gen) / math.sqrt(dim)
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    z = torch.randn(n, dim, generator=gen).mul_(0.5 * scales)
    z[:, :structured] += centres[labels]
    x = z @ mixing
    del z
    return x.add_(0.05).relu_()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Side:
    """One timed side: ``run`` builds everything it needs and returns (its result, the k-means
    iterations it ran, or None where it runs no k-means)."""
    name: str
    run: Callable[[], tuple[object, Optional[int]]]


@dataclasses.dataclass
class Measured:
    """A side's best wall and best CPU seconds over the rounds (CPU time of all threads: on a
    machine other jobs share, wall time measures their load as much as ours, CPU time far
    less; both ratios are reported), what it ran with, and its result."""
    wall: float = math.inf
    cpu: float = math.inf
    iterations: Optional[int] = None
    torch_threads: int = 0
    faiss_threads: int = 0
    result: object = None

    def summary(self) -> dict[str, object]:
        return {"wall_seconds": self.wall, "cpu_seconds": self.cpu,
                "kmeans_iterations": self.iterations, "torch_threads": self.torch_threads,
                "faiss_threads": self.faiss_threads}


def measure(sides: list[Side], rounds: int, device: torch.device) -> dict[str, Measured]:
    """Every side once per round, in turns (reversed every other round), with the device's
    queued work finished on both ends of each timing; prints each timing at once (a long run
    shows its progress)."""
    measured = {side.name: Measured() for side in sides}
    for round_ in range(rounds):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            result, iterations = side.run()
            synchronize(device)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            best = measured[side.name]
            best.wall, best.cpu = min(best.wall, wall), min(best.cpu, cpu)
            best.iterations, best.result = iterations, result
            best.torch_threads, best.faiss_threads = (torch.get_num_threads(),
                                                      faiss.omp_get_max_threads())
            print(f"round {round_ + 1} {side.name:40s} {wall:9.2f} s wall {cpu:9.2f} s CPU "
                  f"{iterations if iterations is not None else '-':>3} iterations "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    return measured


class _IterationCounter(logging.Handler):
    """Counts the engine's per-iteration DEBUG records (``lloyd``'s "iteration N: ...")."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += str(record.msg).startswith("iteration ")


@contextmanager
def engine_iterations() -> Iterator[_IterationCounter]:
    """The k-means iterations the engine runs inside the block."""
    logger = logging.getLogger("dcluster.clustering.engine")
    counter, level = _IterationCounter(), logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)


def warm_up(device: torch.device, ngpu: int) -> None:
    """First calls into MKL/OpenMP/cuBLAS/FAISS pay one-off start-up costs that are not the
    method's."""
    a = torch.randn(512, 512, dtype=torch.float64, device=device)
    torch.linalg.eigh(a @ a.T)
    torch.linalg.qr(a.float())
    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    faiss.Kmeans(16, 8, niter=2, gpu=ngpu or False).train(x)


def stage(x: torch.Tensor, cfg: ClusteringConfig, seed: int, comm: Comm) -> tuple[None, int]:
    """The epoch's clustering stage on one process, every image with a feature row."""
    with engine_iterations() as iterations:
        cluster_shards(x, np.arange(len(x)), len(x), cfg, comm, seed, x.device)
    return None, iterations.count


def reduce(x: torch.Tensor, cfg: ClusteringConfig, seed: int, comm: Comm):
    """The stage's first half, as it runs it: (reduced vectors, the fitted transform)."""
    transform = fit_shared_transform(x, row_layout(x, comm), cfg, comm, seed)
    return reduce_rows(x, transform, cfg), transform


def bare_kmeans(x: np.ndarray, k: int, niter: int, seed: int,
                ngpu: int) -> tuple[np.ndarray, int]:
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, gpu=ngpu or False,
                      max_points_per_centroid=-(-x.shape[0] // k), min_points_per_centroid=1)
    km.train(x)
    return km.index.search(x, 1)[1].ravel(), len(km.iteration_stats)


def faiss_clustering(x: np.ndarray, init: np.ndarray, niter: int) -> tuple[np.ndarray, int]:
    """``faiss.Clustering`` from the centroids ``init`` on every point, and the final
    assignment."""
    clus = faiss.Clustering(x.shape[1], init.shape[0])
    clus.niter, clus.max_points_per_centroid = niter, -(-x.shape[0] // init.shape[0])
    faiss.copy_array_to_vector(init.ravel(), clus.centroids)
    index = faiss.IndexFlatL2(x.shape[1])
    clus.train(x, index)
    return index.search(x, 1)[1].ravel(), clus.iteration_stats.size()


def engine_kmeans(backend: Callable[[np.ndarray], object], x: np.ndarray, init: np.ndarray,
                  niter: int) -> tuple[np.ndarray, int]:
    """The engine from the centroids ``init``, its assignment backend built from ``x`` here
    (inside the timer, as the FAISS sides build their index)."""
    with engine_iterations() as iterations:
        labels = lloyd(backend(x), init.shape[0], niter=niter, seed=0, init=init).labels
    return labels, iterations.count


def gemm_rate(device: torch.device, n: int, d: int, k: int, repeats: int = 5) -> float:
    """float32 FLOP/s of an (n x d) @ (d x k) product on ``device``, best of ``repeats``."""
    a = torch.randn(n, d, device=device)
    b = torch.randn(d, k, device=device)
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n * d * k / best


def assign_rate(data, centroids: np.ndarray, device: torch.device, repeats: int = 3) -> float:
    """FLOP/s (2 n k d) of one assignment pass of ``data``, best of ``repeats``."""
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        data.assign_to(centroids, with_sums=True)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * data.count() * centroids.shape[0] * centroids.shape[1] / best


def gpu_rates(reduced: np.ndarray, k: int, device: torch.device) -> dict[str, float]:
    """The PyTorch backend's assignment rate on the GPU as a share of its GEMM rate, and
    FAISS's GPU flat index beside it where installed."""
    centroids = reduced[np.random.default_rng(0).choice(len(reduced), k, replace=False)]
    gemm = gemm_rate(device, min(len(reduced), 65536), reduced.shape[1], k)
    torch_rate = assign_rate(TorchAssign(reduced, [device]), centroids, device)
    out = {"gpu_gemm_tflops": gemm / 1e12, "torch_assign_tflops": torch_rate / 1e12,
           "torch_assign_share_of_gemm": torch_rate / gemm}
    if available_gpus():
        faiss_rate = assign_rate(faiss_gpus(reduced, 1), centroids, device)
        out.update(faiss_gpu_assign_tflops=faiss_rate / 1e12,
                   faiss_gpu_assign_share_of_gemm=faiss_rate / gemm)
    for key, value in out.items():
        print(f"{key:40s} {value:9.3f}")
    return out


def original_stage(x: np.ndarray, k: int, niter: int, seed: int,
                   ngpu: int) -> tuple[np.ndarray, int]:
    """DeepCluster's preprocess_features + run_kmeans: faiss PCA-whitening on all rows, L2,
    faiss.Clustering on a flat index, then the search for the labels."""
    pca = faiss.PCAMatrix(x.shape[1], PCA_DIM, -0.5)  # eigen_power is positional only
    pca.train(x)
    reduced = pca.apply(x)
    faiss.normalize_L2(reduced)
    clus = faiss.Clustering(PCA_DIM, k)
    clus.niter, clus.seed = niter, seed
    clus.max_points_per_centroid = -(-x.shape[0] // k)  # every point, as ours
    index = flat_l2_index(PCA_DIM, ngpu)
    clus.train(reduced, index)
    return index.search(reduced, 1)[1].ravel(), clus.iteration_stats.size()


def captured_variance_vs_exact(x: torch.Tensor, projection: torch.Tensor) -> float:
    """Variance of all rows in span(projection) over that in the exact top-PCA_DIM subspace
    of their covariance."""
    cov = PCAStats(x.shape[1], device=x.device).update(x).covariance()
    exact = torch.linalg.eigvalsh(cov).flip(0)[:PCA_DIM].sum()
    q = torch.linalg.qr(projection.double().to(x.device)).Q
    return float(torch.einsum("ij,ij->", q, cov @ q) / exact)


def agreement(x: torch.Tensor, cfg: ClusteringConfig, seed: int, comm: Comm,
              sampled_labels: np.ndarray) -> dict[str, float]:
    """NMI of the sampled fit's labels with an all-rows fit's (same k-means seed), and of two
    k-means seeds on the all-rows vectors."""
    full, _ = reduce(x, dataclasses.replace(cfg, pca_sample=0), seed, comm)
    a = cluster_reduced(full, cfg, seed).labels
    b = cluster_reduced(full, cfg, seed + 1).labels
    return {"nmi_sampled_vs_all_rows_fit": normalized_mutual_info_score(sampled_labels, a),
            "nmi_two_kmeans_seeds": normalized_mutual_info_score(a, b)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pca-sample", type=int, default=ClusteringConfig.pca_sample,
                        help="clustering.pca_sample (0: all rows)")
    parser.add_argument("--device", default="cpu", help="where the features live: cpu | cuda")
    parser.add_argument("--skip-original", action="store_true",
                        help="do not time the original DeepCluster stage (it is the slowest)")
    parser.add_argument("--agreement", action="store_true",
                        help="also the label agreement of the sampled PCA with the all-rows fit")
    parser.add_argument("--quick", action="store_true", help="20k x 1024, k=200 (seconds)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="turns of every side; each side's best time counts")
    args = parser.parse_args()
    if args.quick:
        args.n, args.dim, args.k = 20_000, 1024, 200

    device = torch.device(args.device)
    comm = Comm(Env(rank=0, world_size=1, local_rank=0, device=device))
    clustering_device = "gpu" if device.type == "cuda" else "cpu"
    ngpu = available_gpus() if device.type == "cuda" else 0
    cfg = ClusteringConfig(k=args.k, pca_dim=PCA_DIM, niter=args.niter,
                           pca_sample=args.pca_sample, device=clustering_device)
    x_host = synthetic_features(args.n, args.dim, n_classes=max(args.k // 4, 2), seed=args.seed)
    x = x_host.to(device)
    warm_up(device, ngpu)

    print(f"N={args.n} D={args.dim} -> {PCA_DIM}, k={args.k}, niter={args.niter}, "
          f"pca_sample={args.pca_sample or 'all'}, device={device} (FAISS GPUs: {ngpu}), "
          f"torch threads={torch.get_num_threads()}, faiss threads={faiss.omp_get_max_threads()}",
          flush=True)
    reduced, transform = reduce(x, cfg, args.seed, comm)
    init = reduced[np.random.default_rng(args.seed).choice(len(reduced), args.k, replace=False)]
    sides = [
        Side("stage", lambda: stage(x, cfg, args.seed, comm)),
        Side("its PCA + whiten + L2 (timed apart)",
             lambda: (reduce(x, cfg, args.seed, comm), None)),
        Side("bare", lambda: bare_kmeans(reduced, args.k, args.niter, args.seed, ngpu)),
        Side("faiss.Clustering, given centroids",
             lambda: faiss_clustering(reduced, init, args.niter)),
        Side("engine, FAISS CPU backend",
             lambda: engine_kmeans(faiss_cpu, reduced, init, args.niter)),
        Side(f"engine, PyTorch backend ({device.type})",
             lambda: engine_kmeans(lambda r: TorchAssign(r, [device]), reduced, init,
                                   args.niter)),
    ]
    if not args.skip_original:
        sides.append(Side("original", lambda: original_stage(x_host.numpy(), args.k,
                                                             args.niter, args.seed, ngpu)))
    runs = measure(sides, args.rounds, device)
    nan = Measured(wall=math.nan, cpu=math.nan)
    stage_, pca, bare = runs["stage"], runs["its PCA + whiten + L2 (timed apart)"], runs["bare"]
    faiss_side = runs["faiss.Clustering, given centroids"]
    engine = runs["engine, FAISS CPU backend"]
    torch_side = runs[f"engine, PyTorch backend ({device.type})"]
    original = runs.get("original", nan)
    backends_nmi = normalized_mutual_info_score(engine.result, torch_side.result)
    engine_nmi = normalized_mutual_info_score(engine.result, faiss_side.result)
    rates = gpu_rates(reduced, args.k, device) if device.type == "cuda" else {}
    variance = captured_variance_vs_exact(x, transform.projection)
    extra = agreement(x, cfg, args.seed, comm, bare.result) if args.agreement else {}
    print(f"eigensolver: {transform.solver}")
    print(f"{'stage / bare k-means':40s} {stage_.wall / bare.wall:9.3f} x wall "
          f"{stage_.cpu / bare.cpu:9.3f} x CPU  (goal <= 1.10)")
    print(f"{'engine / faiss.Clustering':40s} {engine.wall / faiss_side.wall:9.3f} x wall "
          f"{engine.cpu / faiss_side.cpu:9.3f} x CPU  (goal <= 1.05; label NMI {engine_nmi:.4f})")
    print(f"{'PyTorch / FAISS backend':40s} {torch_side.wall / engine.wall:9.3f} x wall  "
          f"(label NMI {backends_nmi:.4f})")
    print(f"{'original / stage':40s} {original.wall / stage_.wall:9.2f} x wall "
          f"{original.cpu / stage_.cpu:9.2f} x CPU  (goal > 1)")
    print(f"{'captured variance / exact top-256':40s} {variance:9.6f}")
    for key, value in extra.items():
        print(f"{key:40s} {value:9.4f}")
    print(json.dumps({
        "n": args.n, "dim": args.dim, "k": args.k, "niter": args.niter,
        "pca_sample": args.pca_sample, "device": str(device), "faiss_gpus": ngpu,
        "load_average": os.getloadavg()[0], "eigensolver": transform.solver,
        "rounds": args.rounds, "setup": "inside each side's timer",
        "stage_over_bare_kmeans": stage_.wall / bare.wall,
        "engine_over_faiss_kmeans": engine.wall / faiss_side.wall,
        "torch_backend_over_faiss": torch_side.wall / engine.wall,
        "nmi_engine_vs_faiss_kmeans": engine_nmi, "nmi_torch_vs_faiss_backend": backends_nmi,
        **rates,
        "stage_speedup_vs_original": original.wall / stage_.wall,
        "pca_captured_variance_vs_exact": variance,
        "stage_over_bare_kmeans_cpu_time": stage_.cpu / bare.cpu,
        "stage_speedup_vs_original_cpu_time": original.cpu / stage_.cpu,
        "stage_seconds": stage_.wall, "stage_pca_seconds": pca.wall,
        "bare_kmeans_seconds": bare.wall, "original_seconds": original.wall,
        "sides": {name: side.summary() for name, side in runs.items()}, **extra,
    }))


if __name__ == "__main__":
    main()
