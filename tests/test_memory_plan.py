"""Where feature rows live (dcluster/parallel/memory_plan.py) on described GPUs at ImageNet and
YFCC100M scale, the host path of the feature pass and the clustering stage on this CPU, the
clustering stage in full float32, and the outbox's page-locked buffer on a described CUDA
runtime. The GPUs below are descriptions passed to the pure decision function, not present."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dcluster.clustering.distributed_stage import cluster_shards
from dcluster.parallel.collectives import Comm
from dcluster.core.config import BankConfig, ClusteringConfig
from dcluster.parallel.distributed import Env
from dcluster.parallel.memory_plan import (GB, GPU_FRACTION, WORKING_SET, Memory, MemoryPlanError,
                                  host_available, local_ranks, place_rows, plan)
from dcluster.parallel.pinned import PinnedBuffer

GiB = 1 << 30
CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
IMAGENET, YFCC100M, DIM = 1_281_167, 95_000_000, 4096
FLOAT32, BFLOAT16 = 4, 2
HOST_PER_NODE = 1024 * GiB  # an 8-GPU node with 1 TiB of host memory
# total memory of each described GPU; free: less the CUDA context and the model (1.5 GiB)
GPUS = {"P100-16": 16, "V100-16": 16, "V100-32": 32, "A100-40": 40, "A100-80": 80,
        "H100-80": 80}


def memory(gpu: str, ranks_per_node: int) -> Memory:
    total = GPUS[gpu] * GiB
    return Memory(gpu_free=total - 3 * GiB // 2, gpu_total=total,
                  host_available=HOST_PER_NODE // ranks_per_node)


def placed(gpu: str, images: int, ranks: int, itemsize: int = FLOAT32) -> str:
    """'gpu' or 'host' for one rank's share of ``images`` rows of DIM values."""
    share = -(-images // ranks)
    return "gpu" if place_rows("rows", share, DIM, itemsize, CUDA,
                               memory(gpu, min(ranks, 8))).on_gpu else "host"


def test_the_papers_single_gpu_imagenet_rows_go_to_host_memory_on_a_16_gb_gpu():
    """1.28M x 4096 float32 = 21.0 GB; a 16 GiB card has 14.5 GiB free, less the 4 GiB working
    set, of which 80 %: 8.4 GiB (9.02 GB)."""
    rows = place_rows("feature pass rows", IMAGENET, DIM, FLOAT32, CUDA, memory("P100-16", 1))
    assert rows.nbytes == 20_990_640_128 and not rows.on_gpu and rows.device == CPU
    assert rows.gpu_budget == int(GPU_FRACTION * (14.5 * GiB - WORKING_SET))
    assert rows.describe() == (
        "feature pass rows: 1281167 x 4096 x 4 B = 20.99 GB in host memory, streamed to the "
        "GPU (above the GPU budget of 9.02 GB = 0.8 x (15.57 GB free - 4.29 GB working set))")
    assert placed("V100-16", IMAGENET, 1) == "host"


@pytest.mark.parametrize("gpu, expected", [
    # ImageNet fp32 on 1, 8, 64 ranks; YFCC100M fp32 and bf16 on 64 ranks
    ("P100-16", ["host", "gpu", "gpu", "host", "host"]),
    ("V100-32", ["gpu", "gpu", "gpu", "host", "gpu"]),
    ("A100-40", ["gpu", "gpu", "gpu", "gpu", "gpu"]),
    ("A100-80", ["gpu", "gpu", "gpu", "gpu", "gpu"]),
    ("H100-80", ["gpu", "gpu", "gpu", "gpu", "gpu"]),
])
def test_described_gpus_at_imagenet_and_yfcc100m_scale(gpu, expected):
    assert [placed(gpu, IMAGENET, 1), placed(gpu, IMAGENET, 8), placed(gpu, IMAGENET, 64),
            placed(gpu, YFCC100M, 64), placed(gpu, YFCC100M, 64, BFLOAT16)] == expected


@pytest.mark.parametrize("ranks", [1, 8])
def test_yfcc100m_on_one_node_fits_neither_gpu_nor_host_and_says_so(ranks):
    """95M x 4096 float32 is 1.56 TB: on 8 ranks 194 GB each, above a rank's 128 GiB share of
    the node; refused before the pass, with the numbers."""
    share = YFCC100M // ranks
    with pytest.raises(MemoryPlanError) as err:
        place_rows("feature pass rows", share, DIM, FLOAT32, CUDA, memory("H100-80", ranks))
    message = str(err.value)
    assert f"{share} x 4096 x 4 B" in message and "more ranks" in message
    assert f"{HOST_PER_NODE / ranks / GB:.2f} GB" in message


def test_without_a_gpu_rows_stay_with_the_device():
    rows = place_rows("rows", 10, 4, 4, CPU, None)
    assert rows.device == CPU and rows.gpu_budget == 0 and "on cpu" in rows.describe()


def test_ranks_per_node_and_available_host_memory(tmp_path):
    assert local_ranks({"LOCAL_WORLD_SIZE": "8"}) == 8
    assert local_ranks({"SLURM_NTASKS_PER_NODE": "4(x2)"}) == 4
    assert local_ranks({}) == 1
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  2048 kB\nMemFree:  10 kB\nMemAvailable:  1024 kB\n")
    assert host_available(str(meminfo)) == 1024 * 1024


def test_the_host_path_clusters_host_rows_as_the_device_path_does():
    """Rows in host memory, the stage on the rank's device (here both the CPU): the same
    labels as rows given as a tensor on that device."""
    rng = np.random.default_rng(0)
    host = (rng.standard_normal((300, 16)) + np.repeat(np.eye(16)[:3] * 8, 100, axis=0))
    host = host.astype(np.float32)
    comm, cfg = Comm(Env(0, 1, 0, CPU)), ClusteringConfig(k=3, pca_dim=4, pca_sample=0)
    indices = np.arange(300)
    from_host = cluster_shards(host, indices, 300, cfg, comm, seed=1, device=CPU)
    from_tensor = cluster_shards(torch.from_numpy(host), indices, 300, cfg, comm, seed=1,
                                 device=CPU)
    assert np.array_equal(from_host.labels, from_tensor.labels)
    assert len(set(from_host.labels.tolist())) == 3


def test_the_clustering_stage_runs_without_tf32_and_restores_the_flags(monkeypatch):
    import dcluster.clustering.distributed_stage as stage

    seen = []
    real = stage.cluster_reduced

    def recording(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     torch.get_float32_matmul_precision()))
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "cluster_reduced", recording)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        x = np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32)
        cluster_shards(x, np.arange(200), 200, ClusteringConfig(k=2, pca_dim=4, pca_sample=0),
                       Comm(Env(0, 1, 0, CPU)), seed=1, device=CPU)
        assert seen == [(False, False, "highest")]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision()) == (True, True, "high")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])


def test_a_bf16_feature_pass_writes_float32_host_rows_once():
    """keep_on_device on the CPU: the rows are one float32 host matrix (no bf16 one beside
    it), the rows of the batches in order."""
    from types import SimpleNamespace

    from dcluster.parallel.execution import Execution
    from dcluster.runtime.extract import extract_features

    images = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)

    class Batches:
        bad_indices: list[int] = []

        def feature_batches(self, indices, batch_size):
            for lo in range(0, len(indices), batch_size):
                part = torch.as_tensor(indices[lo:lo + batch_size])
                yield SimpleNamespace(images=images[part], indices=part)

    layer = torch.nn.Linear(3, 5)
    got = extract_features(torch.nn.Sequential(layer), Batches(), [6, 0, 3, 2], 3, CPU,
                           "never", False, compute=layer, keep_on_device=True,
                           execution=Execution(CPU, "bf16"))
    assert isinstance(got.features, np.ndarray) and got.features.dtype == np.float32
    assert got.features.shape == (4, 5) and list(got.indices) == [6, 0, 3, 2]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(images[[6, 0, 3, 2]]).float()
    np.testing.assert_array_equal(got.features, want.numpy())


class DescribedRuntime:
    """What torch.cuda.cudart() offers for page-locking, recording the calls (no GPU here)."""

    def __init__(self, error: int = 0) -> None:
        self.calls: list[tuple] = []
        self.error = error

    def cudaHostRegister(self, pointer: int, nbytes: int, flags: int) -> int:
        self.calls.append(("register", pointer, nbytes, flags))
        return self.error

    def cudaHostUnregister(self, pointer: int) -> int:
        self.calls.append(("unregister", pointer))
        return 0


def test_an_outbox_buffer_is_page_locked_at_its_exact_size_and_unlocked_on_release():
    """300 x 6 float32 = 7200 bytes, not the 8192 torch's caching host allocator would pin and
    keep."""
    runtime = DescribedRuntime()
    buffer = PinnedBuffer((300, 6), torch.float32, pin=True, runtime=runtime)
    pointer = buffer.tensor.data_ptr()
    assert runtime.calls == [("register", pointer, 7200, 1)]
    buffer.release()
    assert runtime.calls[1:] == [("unregister", pointer)] and buffer.tensor is None
    buffer.release()  # once only
    assert len(runtime.calls) == 2


def test_a_failed_page_lock_is_an_error_naming_the_size():
    with pytest.raises(RuntimeError, match="7200 bytes failed: cudaError 2"):
        PinnedBuffer((300, 6), torch.float32, pin=True, runtime=DescribedRuntime(error=2))
    assert PinnedBuffer((3, 2), torch.float32, pin=False).tensor.shape == (3, 2)


def test_a_bank_with_automatic_memory_lives_with_a_cpu_device():
    from dcluster.runtime.extract import ShardFeatures
    from dcluster.runtime.feature_bank import FeatureBank

    bank = FeatureBank(10, Comm(Env(0, 1, 0, CPU)), BankConfig(), CPU)
    assert BankConfig().memory == "auto" and bank.storage is None
    bank.refresh(ShardFeatures(np.ones((10, 3), dtype=np.float32), np.arange(10)), epoch=0)
    assert bank.storage == CPU and bank.features().features.shape == (10, 3)


def test_a_repeated_plan_is_logged_once_and_a_changed_one_again(caplog):
    caplog.set_level("DEBUG", logger="dcluster.parallel.memory_plan")
    for rows in (1000, 1000, 1000, 2000):
        plan("rows of this test", rows, 8, FLOAT32, CPU)
    levels = [(r.levelname, "1000 x 8" in r.getMessage()) for r in caplog.records]
    assert levels == [("INFO", True), ("DEBUG", True), ("DEBUG", True), ("INFO", False)]
