"""The distributed pieces: environment detection, shards, the gather and sharded clustering
stages across real gloo processes (spawned, CPU) against the single-process results."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from dcluster.clustering.distributed_stage import (cluster_shards, gather_reduced,
                                                   spread_labels)
from dcluster.clustering.kmeans import run_kmeans
from dcluster.clustering.pca import l2_normalize
from dcluster.clustering.engine import split_empty_clusters
from dcluster.parallel.collectives import Comm
from dcluster.core.config import ClusteringConfig, ConfigError
from dcluster.parallel.distributed import (Env, detect_env, expand_nodelist, my_indices,
                                  rendezvous_port, shard_bounds)
from dcluster.core.metrics import nmi
from dcluster.runtime.sampler import balanced_order, rank_slice
from ranks import spawn_ranks

CPU = torch.device("cpu")
SINGLE = Comm(Env(0, 1, 0, CPU))


# --- where a process sits -------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("node07", ["node07"]),
    ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("a,b[003-004]", ["a", "b003", "b004"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node]01[", "node[3-1]", "node[a-b]", ""])
def test_expand_nodelist_rejects_malformed_lists(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_torchrun_variables_come_first():
    env = detect_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h0",
                      "MASTER_PORT": "29500", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 3, 4, 1)
    assert env.init_method == "env://" and env.device == CPU and not env.is_main


SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
              "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_ID": "0",
              "SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_NODELIST": "gpu[08-09]"}


def test_slurm_step_uses_the_steps_tasks_and_first_host():
    env = detect_env(SLURM_STEP)
    assert (env.launcher, env.rank, env.world_size) == ("slurm", 2, 3)
    assert env.init_method == f"tcp://gpu08:{rendezvous_port('4242', 0)}"


def test_sbatch_batch_step_is_a_single_process():
    """The batch script sees SLURM_NTASKS=4 and SLURM_PROCID=0, but no srun step: one process
    that must not wait for three peers."""
    batch = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")}
    assert detect_env(batch).world_size == 1


def test_a_requeued_job_gets_another_port():
    first = detect_env(SLURM_STEP).master_port
    again = detect_env({**SLURM_STEP, "SLURM_RESTART_COUNT": "1"}).master_port
    assert first != again and 20000 <= min(first, again) and max(first, again) < 30000


def test_submitit_job_environment(monkeypatch):
    for key, value in {**SLURM_STEP, "SUBMITIT_EXECUTOR": "slurm", "SLURM_NODEID": "0",
                       "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "3"}.items():
        monkeypatch.setenv(key, value)
    env = detect_env()
    assert (env.launcher, env.rank, env.world_size) == ("submitit", 2, 3)
    assert env.master_addr in ("gpu07", "gpu08")  # submitit reads the job's node list


def test_bad_rank_variables_are_a_config_error():
    with pytest.raises(ConfigError, match="RANK"):
        detect_env({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match="rank 2 of world size 2"):
        detect_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


# --- shards and sampler slices --------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_index_once(n, world):
    shards = [my_indices(n, Env(r, world, 0, CPU)) for r in range(world)]
    assert np.array_equal(np.concatenate(shards), np.arange(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_slices_partition_the_global_list(world):
    labels = np.random.default_rng(0).integers(0, 7, 1001)
    order = balanced_order(labels, seed=3, epoch=2)
    slices = [rank_slice(order, r, world) for r in range(world)]
    assert len({len(s) for s in slices}) == 1
    interleaved = np.stack(slices, axis=1).ravel()  # step s of all ranks, rank by rank
    usable = len(order) - len(order) % world
    assert np.array_equal(interleaved, order[:usable])


def coverage_worker(out: Path, sizes: tuple[int, ...], comm: Comm) -> None:
    """Gather every rank's shard of indices to rank 0, and spread per-rank labels to all."""
    for n in sizes:
        mine = my_indices(n, Env(comm.rank, comm.world_size, 0, CPU))
        counts = [len(c) for c in comm.all_gather_object(mine)]
        gathered = comm.gather_rows(mine, counts)
        spread = spread_labels(mine * 10, mine, n, comm)
        np.save(out / f"spread{n}_rank{comm.rank}.npy", spread)
        if comm.is_main:
            np.save(out / f"gathered{n}.npy", gathered)


@pytest.mark.parametrize("world", [2, 3])
def test_gathered_and_spread_indices_cover_every_image_once(world, tmp_path):
    sizes = (1, 7, 1000)
    spawn_ranks(functools.partial(coverage_worker, tmp_path, sizes), world)
    for n in sizes:
        assert np.array_equal(np.load(tmp_path / f"gathered{n}.npy"), np.arange(n))
        for rank in range(world):
            assert np.array_equal(np.load(tmp_path / f"spread{n}_rank{rank}.npy"),
                                  np.arange(n) * 10)


def uneven_rows_worker(out: Path, comm: Comm) -> None:
    """Gather shards of uneven sizes (one empty with 3 ranks) in rounds of a few rows: each
    row holds its global index, so rank 0 can check where every row landed."""
    import dcluster.parallel.collectives as collectives

    collectives.CHUNK_BYTES = 3 * 2 * 8 * comm.world_size  # 3 rows of 2 float64 per round
    counts = [7, 0, 4][:comm.world_size] if comm.world_size == 3 else [5, 2][:comm.world_size]
    lo = sum(counts[:comm.rank])
    mine = np.repeat(np.arange(lo, lo + counts[comm.rank], dtype=np.float64)[:, None], 2, axis=1)
    gathered = comm.gather_rows(mine, counts)
    if comm.is_main:
        np.save(out / "gathered.npy", gathered)
    else:
        assert gathered is None


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gather_collective_places_uneven_shards_by_global_index(world, tmp_path):
    if world == 1:
        uneven_rows_worker(tmp_path, SINGLE)
    else:
        spawn_ranks(functools.partial(uneven_rows_worker, tmp_path), world)
    gathered = np.load(tmp_path / "gathered.npy")
    total = {1: 5, 2: 7, 3: 11}[world]
    assert np.array_equal(gathered, np.repeat(np.arange(total, dtype=np.float64)[:, None], 2, 1))


def test_pca_sample_is_deterministic_per_seed_and_independent_of_the_world_size():
    """The rows the PCA statistics use: the same for the same (seed, epoch) seed, another
    subset for another, and the same global rows whether one rank or three hold them."""
    from dcluster.clustering.distributed_stage import RowLayout, pca_sample_rows

    def global_rows(counts, seed):
        layout = RowLayout(counts, 16)
        offsets = np.concatenate(([0], np.cumsum(counts)))
        return np.concatenate([pca_sample_rows(layout, r, 100, seed) + offsets[r]
                               for r in range(len(counts))])

    one = global_rows([1000], seed=5)
    assert len(one) == 100 and np.array_equal(one, np.unique(one))
    assert np.array_equal(one, global_rows([1000], seed=5))
    assert np.array_equal(one, global_rows([400, 0, 600], seed=5))
    assert not np.array_equal(one, global_rows([1000], seed=6))
    assert pca_sample_rows(RowLayout([60, 40], 16), 0, 100, seed=5) is None  # all rows


def sampled_stage_worker(out: Path, comm: Comm) -> None:
    features, indices = feature_pass(comm.rank, comm.world_size)
    cfg = dataclasses.replace(STAGE_CFG, pca_sample=300)
    gathered = gather_reduced(features, indices, N_IMAGES, cfg, comm, seed=11)
    if comm.is_main:
        np.save(out / f"sampled_matrix_{comm.world_size}.npy", gathered.rows)


def test_sampled_pca_fit_is_the_same_on_two_ranks_as_on_one(tmp_path):
    sampled_stage_worker(tmp_path, SINGLE)
    spawn_ranks(functools.partial(sampled_stage_worker, tmp_path), 2)
    one, two = (np.load(tmp_path / f"sampled_matrix_{w}.npy") for w in (1, 2))
    np.testing.assert_allclose(two, one, atol=1e-4)


# --- the clustering stage: 2 ranks against 1 ------------------------------------------------

N_IMAGES, UNREADABLE = 801, (5, 400, 640)
STAGE_CFG = ClusteringConfig(k=6, pca_dim=12, niter=15)


def blob_features(n: int = N_IMAGES, dim: int = 48, blobs: int = 6) -> np.ndarray:
    """Well separated clusters in a space of larger dimension than the PCA output, with a
    large common offset (as ReLU-like features have). The noise has a distinct variance along
    each axis: with isotropic noise the trailing principal directions are ill-defined, and
    rounding alone (sums added in another order) could rotate them."""
    rng = np.random.default_rng(7)
    centres = rng.normal(scale=4.0, size=(blobs, dim))
    noise = rng.normal(size=(n, dim)) * np.geomspace(2.0, 0.2, dim)
    return (5.0 + centres[rng.integers(0, blobs, n)] + noise).astype(np.float32)


def feature_pass(rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """What a rank's feature pass returns: its shard's rows, without the unreadable images."""
    indices = my_indices(N_IMAGES, Env(rank, world, 0, CPU))
    indices = indices[~np.isin(indices, UNREADABLE)]
    return blob_features()[indices], indices


def run_stage(out: Path, comm: Comm) -> None:
    features, indices = feature_pass(comm.rank, comm.world_size)
    for mode in ("gather", "sharded"):
        cfg = dataclasses.replace(STAGE_CFG, mode=mode)
        result = cluster_shards(features, indices, N_IMAGES, cfg, comm, seed=11, device=CPU)
        np.save(out / f"{mode}_labels_rank{comm.rank}.npy", result.labels)
    gathered = gather_reduced(features, indices, N_IMAGES, STAGE_CFG, comm)
    if comm.is_main:
        np.save(out / "matrix.npy", gathered.rows)
        np.save(out / "indices.npy", np.flatnonzero(gathered.present))


def test_two_ranks_gather_the_same_matrix_and_labels_as_one(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    run_stage(single, SINGLE)
    spawn_ranks(functools.partial(run_stage, tmp_path), 2)

    indices = np.load(tmp_path / "indices.npy")
    assert np.array_equal(indices, np.load(single / "indices.npy"))
    assert np.array_equal(indices, np.setdiff1d(np.arange(N_IMAGES), UNREADABLE))
    # The same unit rows up to float rounding, not bit for bit: the float32 chunk products of
    # the PCA statistics are summed over other chunks and in another order, and the trailing
    # principal directions amplify that (about 1e-7 of the largest variance) by the ratio of
    # the largest eigenvalue to their gaps.
    np.testing.assert_allclose(np.load(tmp_path / "matrix.npy"), np.load(single / "matrix.npy"),
                               atol=1e-4)
    labels = np.load(single / "gather_labels_rank0.npy")
    assert (labels[list(UNREADABLE)] == -1).all() and (np.delete(labels, UNREADABLE) >= 0).all()
    for rank in range(2):
        assert np.array_equal(np.load(tmp_path / f"gather_labels_rank{rank}.npy"), labels)


def test_sharded_stage_gives_every_rank_the_same_labels(tmp_path):
    """Sharded mode on the same blobs: one label vector on all ranks, -1 exactly where an
    image was unreadable, and the blobs found as gather mode finds them."""
    spawn_ranks(functools.partial(run_stage, tmp_path), 2)
    sharded = np.load(tmp_path / "sharded_labels_rank0.npy")
    assert np.array_equal(np.load(tmp_path / "sharded_labels_rank1.npy"), sharded)
    assert np.array_equal(np.flatnonzero(sharded < 0), UNREADABLE)
    keep = sharded >= 0
    assert nmi(sharded[keep], np.load(tmp_path / "gather_labels_rank0.npy")[keep]) > 0.95


# --- sharded k-means ------------------------------------------------------------------------

def sphere_points(n: int = 10000, dim: int = 16) -> np.ndarray:
    """L2-normalised isotropic points, like whitened features: many clusterings of nearly
    equal loss, so the objective compares the algorithms rather than their luck."""
    return l2_normalize(np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32))


def sharded_worker(out: Path, k: int, comm: Comm) -> None:
    x = sphere_points()
    lo, hi = shard_bounds(len(x), comm.world_size)[comm.rank: comm.rank + 2]
    km = run_kmeans(x[lo:hi], k, seed=5, niter=20, device="cpu", backend="faiss", comm=comm)
    np.savez(out / f"rank{comm.rank}.npz", labels=km.labels, centroids=km.centroids,
             objective=km.objective, sizes=km.sizes)


def test_sharded_kmeans_matches_faiss_objective_within_one_percent(tmp_path):
    k = 32
    spawn_ranks(functools.partial(sharded_worker, tmp_path, k), 2)
    x = sphere_points()
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    assert np.array_equal(ranks[0]["centroids"], ranks[1]["centroids"])
    labels = np.concatenate([r["labels"] for r in ranks])
    centroids = ranks[0]["centroids"]
    objective = float(ranks[0]["objective"])
    # the objective and sizes are those of the labels every rank returned
    assert objective == pytest.approx(((x - centroids[labels]) ** 2).sum(), rel=1e-4)
    assert np.array_equal(ranks[0]["sizes"], np.bincount(labels, minlength=k))
    faiss = run_kmeans(x, k, seed=5, niter=20, device="cpu")
    assert abs(objective / faiss.objective - 1) < 0.01


def test_sharded_kmeans_reseeds_empty_clusters():
    """Three distinct points, many copies each, k = 5: initial centroids coincide, so clusters
    go empty and must be split off the populated ones."""
    x = np.repeat(np.eye(3, 4, dtype=np.float32), 50, axis=0)
    km = run_kmeans(x, 5, seed=0, niter=5, device="cpu", backend="faiss", comm=SINGLE)
    assert km.n_reseeded > 0 and km.sizes.sum() == len(x)
    # every point sits on a centroid, up to the split perturbation (1/1024 of a unit vector)
    assert km.objective < len(x) * 1e-5


def test_split_empty_clusters_halves_a_cluster_symmetrically():
    centroids = np.array([[0, 0], [2, 4], [9, 9], [0, 0]], dtype=np.float32)
    sizes = np.array([0, 10, 1, 0])
    split = split_empty_clusters(centroids, sizes, np.random.default_rng(0))
    assert split == 2
    # singletons are never split: every new centroid comes from cluster 1's lineage
    assert np.allclose(centroids[2], [9, 9])
    assert np.allclose(centroids[[0, 1, 3]].mean(axis=0), [2, 4], rtol=2e-3)
    assert len({tuple(c) for c in centroids}) == 4
    again = np.array([[0, 0], [2, 4], [9, 9], [0, 0]], dtype=np.float32)
    split_empty_clusters(again, np.array([0, 10, 1, 0]), np.random.default_rng(0))
    assert np.array_equal(again, centroids)  # the same rng, the same split on every rank


def exchange_worker(out: Path, round_bytes: int, comm: Comm) -> None:
    """Rank r sends rank d (d + 1) * (r + 2) rows, each saying (source, destination, number),
    in rounds of ``round_bytes``; saves what it received."""
    import dcluster.parallel.collectives as collectives

    collectives.CHUNK_BYTES = round_bytes
    send_counts = [(d + 1) * (comm.rank + 2) for d in range(comm.world_size)]
    recv_counts = [(comm.rank + 1) * (s + 2) for s in range(comm.world_size)]
    rows = torch.tensor([[comm.rank, d, i] for d, n in enumerate(send_counts) for i in range(n)],
                        dtype=torch.int64)
    import torch.distributed as dist

    real, rounds = dist.all_to_all_single, []
    dist.all_to_all_single = lambda *args, **kwargs: rounds.append(real(*args, **kwargs))
    try:
        got = comm.all_to_all_rows(rows, send_counts, recv_counts)
    finally:
        dist.all_to_all_single = real
    torch.save((got, len(rounds)), out / f"received_rank{comm.rank}_{round_bytes}.pt")


def test_the_row_exchange_in_small_rounds_delivers_what_one_round_does(tmp_path):
    """Rounds of 2 rows (of 3 int64) per pair of the 2 ranks, against one round."""
    small_round, one_round = 2 * 3 * 8 * 2, 64 << 20
    for round_bytes in (small_round, one_round):
        spawn_ranks(functools.partial(exchange_worker, tmp_path, round_bytes), 2)
    for rank in range(2):
        small, small_rounds = torch.load(tmp_path / f"received_rank{rank}_{small_round}.pt")
        whole, whole_rounds = torch.load(tmp_path / f"received_rank{rank}_{one_round}.pt")
        want = torch.tensor([[s, rank, i] for s in range(2) for i in range((rank + 1) * (s + 2))])
        assert torch.equal(whole, want) and torch.equal(small, want)
        # the longest block, rank 1's 6 rows for rank 1, takes 3 rounds of 2 rows
        assert (small_rounds, whole_rounds) == (3, 1)


def side_group_worker(out: Path, comm: Comm) -> None:
    """A Comm over a described NCCL group (no GPU here: get_backend answers "nccl"), which
    makes the gloo side group an NCCL job waits in; saves that group's timeout."""
    import torch.distributed as dist

    real = dist.get_backend
    dist.get_backend = lambda group=None: "nccl" if group is None else real(group)
    try:
        host = Comm(comm.env, timeout_s=75).on_host()
    finally:
        dist.get_backend = real
    assert host is not comm and dist.get_backend(host.group) == "gloo"
    timeout = host.group._get_backend(torch.device("cpu")).options._timeout
    (out / f"timeout{comm.rank}.txt").write_text(str(timeout.total_seconds()))


def test_the_gloo_side_group_of_a_described_nccl_job_has_the_configured_timeout(tmp_path):
    spawn_ranks(functools.partial(side_group_worker, tmp_path), 2)
    assert [float((tmp_path / f"timeout{r}.txt").read_text()) for r in range(2)] == [75.0, 75.0]
