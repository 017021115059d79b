"""The k-means engine: the PyTorch and FAISS backends agree from the same initial centroids
(one process, 2 gloo ranks in gather and sharded mode), empty clusters split alike on every
rank, results are a function of the seed, and `auto` picks the documented backend for
described hardware."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import torch

import dcluster.clustering.assign as assign
import dcluster.clustering.kmeans as kmeans
from dcluster.clustering.assign import TorchAssign, faiss_cpu
from dcluster.clustering.backend import Backend, BackendError, choose_backend
from dcluster.clustering.distributed_stage import cluster_shards, pca_whiten_l2
from dcluster.clustering.distributed_stage import kmeans as stage_kmeans
from dcluster.clustering.engine import lloyd
from dcluster.clustering.kmeans import assigner_for, run_kmeans
from dcluster.parallel.collectives import Comm
from dcluster.core.config import ClusteringConfig
from dcluster.parallel.distributed import Env, shard_bounds
from dcluster.parallel.hardware import FAISS_BUILDS, GPU
from dcluster.core.metrics import nmi
from ranks import spawn_ranks

CPU = torch.device("cpu")
P100, V100, A100, H100 = (GPU(0, "Tesla P100-PCIE-16GB", 60), GPU(0, "Tesla V100-SXM2-32GB", 70),
                          GPU(0, "NVIDIA A100-SXM4-80GB", 80), GPU(0, "NVIDIA H100 80GB HBM3", 90))


def points(n: int = 6000, d: int = 32, centres: int = 40, seed: int = 0) -> np.ndarray:
    """Blobs on a sphere: many clusters of comparable loss, as whitened features are."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def assert_agree(a, b) -> None:
    assert nmi(a.labels, b.labels) >= 0.999
    assert abs(a.objective / b.objective - 1) <= 1e-3


def test_torch_and_faiss_backends_agree_in_one_process():
    x = points()
    runs = {name: run_kmeans(x, 50, seed=3, niter=15, device="cpu", backend=name)
            for name in ("faiss", "torch")}
    assert runs["faiss"].backend == "faiss-cpu" and runs["torch"].backend == "torch cpu"
    assert_agree(runs["torch"], runs["faiss"])
    # the objective is that of the returned labels to the returned centroids
    r = runs["torch"]
    assert r.objective == pytest.approx(((x - r.centroids[r.labels]) ** 2).sum(), rel=1e-4)


def test_torch_rows_split_over_devices_and_chunks_give_the_same_result(monkeypatch):
    """The multi-GPU path (one part per device, all queued before any is read) and small
    chunks, run on CPU devices: the same labels and centroids as one part in one chunk."""
    x = points(3000)
    whole = lloyd(TorchAssign(x, [CPU]), 30, niter=8, seed=1)
    monkeypatch.setattr(assign, "scratch_rows", lambda device, k, d: 97)
    split = lloyd(TorchAssign(x, [CPU, CPU, CPU]), 30, niter=8, seed=1)
    np.testing.assert_array_equal(split.labels, whole.labels)
    np.testing.assert_allclose(split.centroids, whole.centroids, rtol=1e-5, atol=1e-6)


def test_same_seed_same_result_other_seed_other_result():
    x = points(2000)
    a, b, c = (lloyd(TorchAssign(x, [CPU]), 20, niter=5, seed=s) for s in (7, 7, 8))
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.objective == b.objective and np.array_equal(a.centroids, b.centroids)
    assert not np.array_equal(a.labels, c.labels)


def test_same_initial_centroids_give_faiss_clusterings_labels():
    """The engine with the FAISS backend against faiss.Clustering itself, both started from
    the same centroids: the same Lloyd iterations."""
    import faiss

    x = points(4000)
    init = x[np.random.default_rng(0).choice(len(x), 40, replace=False)]
    ours = lloyd(faiss_cpu(x), 40, niter=10, seed=0, init=init)
    clus = faiss.Clustering(x.shape[1], 40)
    clus.niter, clus.max_points_per_centroid = 10, len(x)
    faiss.copy_array_to_vector(init.ravel(), clus.centroids)
    index = faiss.IndexFlatL2(x.shape[1])
    clus.train(x, index)
    theirs = index.search(x, 1)[1].ravel()
    assert nmi(ours.labels, theirs) >= 0.999


def repeated_points() -> np.ndarray:
    """Three distinct points, many copies each: with k = 6 clusters go empty and are split."""
    return np.repeat(np.eye(3, 4, dtype=np.float32), 60, axis=0)


def rank_worker(out: Path, comm: Comm) -> None:
    x = points(4000)
    lo, hi = shard_bounds(len(x), comm.world_size)[comm.rank: comm.rank + 2]
    indices = np.arange(lo, hi)
    cfg = ClusteringConfig(k=30, pca_dim=16, niter=10, pca_sample=0, device="cpu")
    for mode in ("gather", "sharded"):
        for backend in ("faiss", "torch"):
            result = cluster_shards(x[lo:hi], indices, len(x),
                                    dataclasses.replace(cfg, mode=mode, backend=backend),
                                    comm, seed=5, device=CPU)
            np.savez(out / f"{mode}-{backend}-world{comm.world_size}-rank{comm.rank}.npz",
                     labels=result.labels, objective=result.objective)
    y = repeated_points()
    lo, hi = shard_bounds(len(y), comm.world_size)[comm.rank: comm.rank + 2]
    split = run_kmeans(y[lo:hi], 6, seed=0, niter=5, device="cpu", backend="torch", comm=comm,
                       own_device=CPU)
    np.savez(out / f"split-world{comm.world_size}-rank{comm.rank}.npz", centroids=split.centroids,
             n_reseeded=split.n_reseeded, sizes=split.sizes, objective=split.objective)


@pytest.mark.parametrize("world", [1, 2])
def test_backends_agree_in_gather_and_sharded_mode_over_gloo_ranks(tmp_path, world):
    spawn_ranks(functools.partial(rank_worker, tmp_path), world)
    for mode in ("gather", "sharded"):
        run = {b: [np.load(tmp_path / f"{mode}-{b}-world{world}-rank{r}.npz")
                   for r in range(world)] for b in ("faiss", "torch")}
        for backend in run.values():  # every rank ends with the same N labels
            for other in backend[1:]:
                assert np.array_equal(other["labels"], backend[0]["labels"])
        faiss_run, torch_run = run["faiss"][0], run["torch"][0]
        assert nmi(faiss_run["labels"], torch_run["labels"]) >= 0.999
        assert abs(float(torch_run["objective"]) / float(faiss_run["objective"]) - 1) <= 1e-3


@pytest.mark.parametrize("mode", ["gather", "sharded"])
def test_the_stage_in_two_steps_with_the_runs_backend_detects_nothing(monkeypatch, mode):
    """DeepCluster's clustering step, pca_whiten_l2 then kmeans with the Backend its run
    resolved once: the labels of the one-call stage from the config's strings, and no
    hardware detection on the way."""
    x = points(600)
    cfg = ClusteringConfig(k=8, pca_dim=16, niter=5, pca_sample=0, device="cpu",
                           backend="torch", mode=mode)
    comm, indices = Comm(Env(0, 1, 0, CPU)), np.arange(len(x))
    reference = cluster_shards(x, indices, len(x), cfg, comm, seed=3, device=CPU)
    chosen = kmeans.machine_backend(cfg.backend, cfg.device)
    monkeypatch.setattr(kmeans, "detect", lambda: pytest.fail("the machine detected again"))
    reduced = pca_whiten_l2(x, indices, len(x), cfg, comm, seed=3, device=CPU)
    assert reduced.mode == mode and reduced.rows.shape == (len(x), 16)
    result = stage_kmeans(reduced, cfg, comm, seed=3, device=CPU, backend=chosen)
    assert np.array_equal(result.labels, reference.labels)
    assert result.objective == reference.objective


def test_empty_clusters_are_split_identically_on_every_rank(tmp_path):
    spawn_ranks(functools.partial(rank_worker, tmp_path), 2)
    ranks = [np.load(tmp_path / f"split-world2-rank{r}.npz") for r in range(2)]
    assert int(ranks[0]["n_reseeded"]) > 0
    assert np.array_equal(ranks[0]["centroids"], ranks[1]["centroids"])
    assert ranks[0]["sizes"].sum() == len(repeated_points())
    # every point sits on a centroid, up to the split perturbation
    assert float(ranks[0]["objective"]) < len(repeated_points()) * 1e-5


@pytest.mark.parametrize("gpus, faiss_build, faiss_gpus, expected", [
    ((P100,), "faiss-gpu", 1, ("torch", 1, "no code for GPU 0")),  # cu12 wheel: sm_70 up
    ((P100,), "faiss-cpu", 0, ("torch", 1, "CPU-only")),
    ((V100, V100), "faiss-gpu", 2, ("faiss", 2, "has code")),
    ((A100,), "faiss-gpu-cuvs", 1, ("faiss", 1, "has code")),
    ((H100,), "faiss-gpu-cuvs", 1, ("faiss", 1, "has code")),
    ((H100,), "faiss-cpu", 0, ("torch", 1, "CPU-only")),
    ((), "faiss-cpu", 0, ("faiss", 0, "no GPU")),
])
def test_auto_picks_the_documented_backend_for_described_hardware(gpus, faiss_build, faiss_gpus,
                                                                  expected):
    chosen = choose_backend("auto", "auto", gpus, FAISS_BUILDS[faiss_build], faiss_gpus)
    kind, n, why = expected
    assert (chosen.kind, chosen.gpus) == (kind, n) and why in chosen.reason


def test_explicit_choices_for_described_hardware():
    p100_faiss = ((P100,), FAISS_BUILDS["faiss-gpu"], 1)
    assert choose_backend("faiss", "auto", *p100_faiss) == Backend(
        "faiss", 0, "no GPU FAISS can use (clustering.backend=faiss with faiss-gpu)")
    assert choose_backend("torch", "auto", (A100,), FAISS_BUILDS["faiss-gpu-cuvs"], 1).kind == "torch"
    assert choose_backend("auto", "cpu", (A100,), FAISS_BUILDS["faiss-gpu-cuvs"], 1).gpus == 0
    assert choose_backend("torch", "auto", (), FAISS_BUILDS["faiss-cpu"], 0) == Backend(
        "torch", 0, "no GPU is visible")
    with pytest.raises(BackendError, match="cannot use the GPUs"):
        choose_backend("faiss", "gpu", *p100_faiss)
    with pytest.raises(BackendError, match="no GPU is visible"):
        choose_backend("auto", "gpu", (), FAISS_BUILDS["faiss-cpu"], 0)
    with pytest.raises(ValueError, match="'cuml'"):
        choose_backend("cuml", "auto", (), FAISS_BUILDS["faiss-cpu"], 0)


def test_rows_go_to_the_own_gpu_unless_the_node_is_asked_for_described_gpu(monkeypatch):
    """Which devices the torch backend is built on, with its construction recorded (no GPU
    here): the process's own GPU, never its peers' (rank 1 of a 4-GPU node assigns on
    cuda:1 alone), and the node's GPUs only with clustering.gpus=node."""
    made = []
    monkeypatch.setattr(kmeans, "TorchAssign", lambda x, devices: made.append(devices))
    x = points(10)
    assigner_for(x, Backend("torch", 4, ""), own_device=torch.device("cuda", 1))
    assigner_for(x, Backend("torch", 4, ""), own_device=torch.device("cuda", 1), node_gpus=True)
    assigner_for(x, Backend("torch", 4, ""), own_device=torch.device("cuda", 2))
    assert made == [[torch.device("cuda", 1)], [torch.device("cuda", i) for i in range(4)],
                    [torch.device("cuda", 2)]]
    assert assigner_for(x, Backend("faiss", 4, ""), own_device=CPU).name == "faiss-cpu"


def test_streamed_and_resident_rows_give_identical_labels_and_sums():
    """The streaming path (rows copied to the device a chunk at a time) and the resident one
    (rows on the device), run on the CPU device with a forced small chunk: the same labels,
    objective and sums, bit for bit, over several Lloyd iterations."""
    x = points(3000)
    resident, streamed = (lloyd(TorchAssign(x, [CPU], resident=keep, chunk_rows=97), 30,
                                niter=8, seed=1) for keep in (True, False))
    np.testing.assert_array_equal(streamed.labels, resident.labels)
    np.testing.assert_array_equal(streamed.centroids, resident.centroids)
    assert streamed.objective == resident.objective
    data = TorchAssign(x, [CPU], resident=False, chunk_rows=97)
    assert data.parts[0].resident is None  # streamed indeed: no copy kept on the device


def test_exact_sums_are_order_independent_and_match_a_float64_reference():
    """The GPU's reduction (index_add_ whose atomics land in any order) made exact: the sums
    of the rows in any order and any chunking are bit-identical, and equal float64 sums to
    within the fixed-point resolution."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5000, 16)).astype(np.float32)
    labels = rng.integers(0, 40, 5000)
    reference = np.zeros((40, 16))
    np.add.at(reference, labels, x.astype(np.float64))
    bound = float(np.abs(x).max())

    def summed(order: np.ndarray, chunk: int) -> np.ndarray:
        sums = assign.ExactSums(40, 16, bound, len(x), CPU)
        for lo in range(0, len(order), chunk):
            rows = order[lo:lo + chunk]
            sums.add(torch.from_numpy(x[rows]), torch.from_numpy(labels[rows]))
        return assign.ExactSums.combined([sums])

    forward = summed(np.arange(len(x)), 5000)
    shuffled = summed(rng.permutation(len(x)), 333)
    np.testing.assert_array_equal(shuffled, forward)
    np.testing.assert_allclose(forward, reference, rtol=0, atol=1e-9)
    # float32 accumulation, as the atomics did: order-dependent in its last bits
    f32 = [np.zeros((40, 16), dtype=np.float32) for _ in range(2)]
    for out, order in zip(f32, (np.arange(len(x)), rng.permutation(len(x)))):
        torch.from_numpy(out).index_add_(0, torch.from_numpy(labels[order]),
                                         torch.from_numpy(x[order]))
    assert not np.array_equal(*f32)


def test_torch_assignments_run_without_tf32_and_restore_the_setting():
    """The training turns TF32 on for Ampere and later; the assignment GEMMs must not use it,
    and must leave the training's setting as they found it."""
    seen = []
    data = TorchAssign(points(200), [CPU])
    original = data._assign_part

    def recording(*args):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return original(*args)

    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        data._assign_part = recording
        data.assign_to(points(200)[:5], with_sums=False)
        assert seen == [False] and torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_a_converged_run_stops_early_and_more_iterations_change_nothing():
    """Well separated blobs converge in a few iterations; the loop then stops (as
    faiss.Clustering does on an unchanged objective) with what more iterations would give."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 16))[rng.integers(0, 8, 2000)] * 10
         + rng.standard_normal((2000, 16))).astype(np.float32)
    short, long = (lloyd(faiss_cpu(x), 8, niter=n, seed=0) for n in (60, 300))
    np.testing.assert_array_equal(short.labels, long.labels)
    assert short.objective == long.objective


def test_faiss_searches_fall_back_to_the_cpu_on_a_gpu_without_faiss_code_described_gpu(
        monkeypatch):
    """A P100 under the cu12 profile: FAISS 1.15.1's wheel has no sm_60 code, and a FAISS GPU
    index there aborts in a kernel. PIC's graph (resolve_gpus) searches on the CPU instead; on
    a V100 it uses the GPU; device=gpu names the reason."""
    from dcluster.clustering.backend import search_backend
    from dcluster.parallel.hardware import Detected, Build

    faiss_gpu = FAISS_BUILDS["faiss-gpu"]
    hw = Detected("cu12", Build("torch 2.14.1", "12"), faiss_gpu, None, (P100,))
    monkeypatch.setattr(kmeans, "detect", lambda: hw)
    monkeypatch.setattr(kmeans, "available_gpus", lambda: 1)
    assert kmeans.resolve_gpus("auto") == 0
    assert search_backend("auto", (V100,), faiss_gpu, 1).gpus == 1
    with pytest.raises(BackendError, match="no code for GPU 0.*6.0"):
        search_backend("gpu", (P100,), faiss_gpu, 1)


def test_backend_rows_name_the_kmeans_knn_and_pic_backends_and_why_described_gpu():
    from dcluster.clustering.backend import backend_rows

    rows = dict(backend_rows("auto", "auto", (P100,), FAISS_BUILDS["faiss-gpu"], 1))
    assert rows["k-means backend"].startswith("PyTorch on 1 GPU(s): ")
    assert rows["k-NN backend"].startswith("PyTorch on each rank's GPU")
    assert rows["PIC backend"].startswith("FAISS on the CPU")
    assert "no code for GPU 0" in rows["PIC backend"]
    rows = dict(backend_rows("auto", "auto", (H100,), FAISS_BUILDS["faiss-gpu"], 1))
    assert rows["k-means backend"].startswith("FAISS on 1 GPU(s)")
    assert rows["PIC backend"].startswith("FAISS on 1 GPU(s)")


def test_rows_stay_resident_only_where_they_fit_the_free_memory_described_gpu(monkeypatch):
    """A described 16 GB card with 6 GB free: 2 GB of rows stay on it, 4 GB stream."""
    monkeypatch.setattr(assign.torch.cuda, "mem_get_info", lambda device: (6 << 30, 16 << 30))
    gpu = torch.device("cuda", 0)
    assert assign.fits_on_device(gpu, 2 << 30) and not assign.fits_on_device(gpu, 4 << 30)
    assert assign.scratch_rows(gpu, 10000, 256) == int((6 << 30) * 0.25) // (4 * 10002 + 20 * 256)


def test_torch_cache_is_emptied_before_faiss_builds_a_gpu_index_described_gpu(monkeypatch):
    """FAISS allocates outside torch's caching allocator: the cache goes back to the GPU
    before StandardGpuResources reserves its temporary memory."""
    import faiss
    from types import SimpleNamespace

    events = []
    monkeypatch.setattr(assign.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(assign.torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(assign.torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    monkeypatch.setattr(faiss, "StandardGpuResources",
                        lambda: events.append("StandardGpuResources"), raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", SimpleNamespace, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, index, co: index,
                        raising=False)
    assign.faiss_gpu(points(10), 0)
    assert events == ["empty_cache", "StandardGpuResources"]
