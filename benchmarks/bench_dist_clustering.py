"""Rank 0's memory, the wall time and the bytes gathered by the distributed clustering step,
against the naive path that gathers the raw features to rank 0.

N x D synthetic features (D = 4096 as AlexNet's fc7; 100 clusters plus unit Gaussian noise)
are split over W ranks (gloo on CPU, W = 1 and 2 by default). Each rank generates its own
contiguous shard, then every rank runs one clustering step:

* ours:  ``cluster_shards`` in gather mode: PCA statistics all-reduced, whitening fitted on
  rank 0, 256-d vectors gathered to rank 0, FAISS k-means there, labels broadcast;
* naive: the raw D-dimensional rows gathered to rank 0, which runs the single-process stage
  (``cluster_shards`` with a one-process Comm) on them, labels broadcast.

Rank 0's peak is its resident set's high-water mark during the step (reset through
/proc/self/clear_refs just before it) minus its resident set before it, when it already holds
its features. Goal: ours at most 1.5 x (N x 256 x 4 B) above the baseline, and 16x fewer
bytes gathered than naive. The d x d PCA statistics and their eigendecomposition cost a fixed
~0.7 GB at D = 4096 whatever N is, so the ratio only reflects the N-dependent part from a
few hundred thousand images on (ImageNet is 1.28M).

    .venv/bin/python benchmarks/bench_dist_clustering.py [--n 500000] [--worlds 1 2]

The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from dcluster.core.faiss_after_torch import faiss
from dcluster.clustering.distributed_stage import cluster_shards
from dcluster.parallel.collectives import Comm
from dcluster.core.config import ClusteringConfig, DistributedConfig
from dcluster.parallel.distributed import Env, my_indices, process_group

BLOCK_ROWS = 8192
CENTRES = 100
CORES = 2


def status_bytes(key: str) -> int:
    """VmRSS (resident now) or VmHWM (peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Start a new high-water mark at the current resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def synthetic_shard(n: int, dim: int, indices: np.ndarray, seed: int) -> np.ndarray:
    """Rows ``indices`` (contiguous) of the N x dim features, the same whatever the split:
    generated in fixed global blocks, each from its own seeded stream, in place."""
    centres = np.random.default_rng([seed, n]).standard_normal((CENTRES, dim), dtype=np.float32)
    out = np.empty((indices.size, dim), dtype=np.float32)
    if indices.size == 0:
        return out
    lo, hi = int(indices[0]), int(indices[-1]) + 1
    for start in range(lo - lo % BLOCK_ROWS, hi, BLOCK_ROWS):
        rng = np.random.default_rng([seed, start])
        rows = min(BLOCK_ROWS, n - start)
        block = rng.standard_normal((rows, dim), dtype=np.float32)
        block += centres[rng.integers(0, CENTRES, rows)]
        a, b = max(start, lo), min(start + rows, hi)
        out[a - lo: b - lo] = block[a - start: b - start]
    return out


def naive_stage(features: np.ndarray, n: int, cfg: ClusteringConfig, comm: Comm, seed: int) -> None:
    """The path the design avoids: the raw rows to rank 0, the single-process stage there
    (with one process, exactly the single-process stage)."""
    counts = comm.all_gather_object(features.shape[0])
    stacked = features if comm.world_size == 1 else comm.gather_rows(features, counts)
    labels = np.empty(n, dtype=np.int64)
    if stacked is not None:
        cpu = torch.device("cpu")
        solo = Comm(Env(rank=0, world_size=1, local_rank=0, device=cpu))
        labels[:] = cluster_shards(stacked, np.arange(n), n, cfg, solo, seed, cpu).labels
    comm.broadcast(labels)


def run_rank(rank: int, world: int, port: int, path: str, args: argparse.Namespace,
             out: Path) -> None:
    threads = max(1, CORES // world)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    env = Env(rank, world, 0, torch.device("cpu"), "benchmark", "127.0.0.1", port)
    cfg = ClusteringConfig(k=args.k, pca_dim=args.pca_dim, niter=args.niter, device="cpu")
    with process_group(env, DistributedConfig(timeout_s=7200)):
        comm = Comm(env)
        indices = my_indices(args.n, env)
        features = synthetic_shard(args.n, args.dim, indices, args.seed)
        gc.collect()
        comm.barrier()
        baseline = status_bytes("VmRSS")
        reset_peak()
        start = time.perf_counter()
        if path == "ours":
            cluster_shards(features, indices, args.n, cfg, comm, args.seed, env.device)
        else:
            naive_stage(features, args.n, cfg, comm, args.seed)
        seconds = time.perf_counter() - start
        peak = status_bytes("VmHWM") - baseline
        counts = comm.all_gather_object(len(indices))
        if comm.is_main:
            width = args.pca_dim if path == "ours" else args.dim
            out.write_text(json.dumps({
                "path": path, "world": world, "seconds": round(seconds, 2),
                "rank0_baseline_bytes": baseline, "rank0_peak_increase_bytes": peak,
                "rank0_peak_over_256d_bytes": round(peak / (args.n * args.pca_dim * 4), 3),
                "gathered_bytes": int(sum(counts[1:])) * width * 4}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--pca-dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--niter", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--paths", nargs="+", default=["ours", "naive"], choices=["ours", "naive"])
    args = parser.parse_args()
    print(f"N={args.n} x D={args.dim} float32 features ({args.n * args.dim * 4 / 1e9:.2f} GB), "
          f"PCA to {args.pca_dim} ({args.n * args.pca_dim * 4 / 1e9:.3f} GB), k={args.k}, "
          f"{args.niter} k-means iterations", flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths:
            for world in args.worlds:
                out = Path(tmp) / f"{path}{world}.json"
                mp.spawn(run_rank, args=(world, free_port(), path, args, out), nprocs=world)
                runs.append(json.loads(out.read_text()))
                r = runs[-1]
                print(f"{path:>5} world {world}: {r['seconds']:8.1f} s, rank 0 peak "
                      f"+{r['rank0_peak_increase_bytes'] / 1e9:.3f} GB "
                      f"({r['rank0_peak_over_256d_bytes']:.2f} x N x 256 x 4 B), gathered "
                      f"{r['gathered_bytes'] / 1e9:.3f} GB", flush=True)
    summary = {**{k: v for k, v in vars(args).items() if k not in ("worlds", "paths")},
               "runs": runs}
    ours = [r for r in runs if r["path"] == "ours"]
    if ours:
        summary["rank0_peak_over_256d_bytes"] = max(r["rank0_peak_over_256d_bytes"] for r in ours)
    gathered = {(r["path"], r["world"]): r["gathered_bytes"] for r in runs if r["world"] > 1}
    pairs = [(gathered[("naive", w)], gathered[("ours", w)]) for p, w in gathered if p == "ours"
             and ("naive", w) in gathered and gathered[("ours", w)]]
    if pairs:
        summary["gathered_bytes_naive_over_ours"] = round(pairs[-1][0] / pairs[-1][1], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
