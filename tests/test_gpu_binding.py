"""Placing ranks on GPUs and gloo on the network across nodes, for described environments
(issue #31, items 5 and 6): a `srun --gpu-bind=closest` job shows each task 4 of its node's 8
GPUs, and a multi-node job whose host names resolve to loopback would hang in gloo."""
from __future__ import annotations

import pytest
import torch

from dcluster.core.config import ConfigError
from dcluster.parallel import distributed
from dcluster.parallel.distributed import (bound_gpu_index, detect_env, gloo_address_problem,
                                           local_world_size)

# 8 tasks on each of 2 nodes, each task bound to its socket's 4 GPUs
CLOSEST = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "13", "SLURM_LOCALID": "5",
           "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
           "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "77",
           "CUDA_VISIBLE_DEVICES": "4,5,6,7"}


def test_a_rank_under_gpu_bind_closest_takes_a_gpu_of_its_group_described_gpu(monkeypatch):
    """Before: local rank 5 with 4 visible GPUs was a ConfigError. Now each of the 8 tasks of
    a node gets a distinct (socket, GPU) pair under Slurm's default block:cyclic spread."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    env = detect_env(CLOSEST)
    assert (env.launcher, env.local_rank, env.device) == ("slurm", 5, torch.device("cuda", 2))
    # cyclic: tasks alternate sockets (0, 2, 4, 6 on the first): distinct GPUs per socket
    socket_of = [task % 2 for task in range(8)]
    pairs = {(socket_of[t], bound_gpu_index(t, 4, 8, "block:cyclic")) for t in range(8)}
    assert len(pairs) == 8
    # block: the first 4 tasks on the first socket
    pairs = {(t // 4, bound_gpu_index(t, 4, 8, "block:block")) for t in range(8)}
    assert len(pairs) == 8


def test_gpu_counts_that_do_not_divide_the_tasks_name_the_fix():
    assert bound_gpu_index(3, 4, 4, "") == 3 and bound_gpu_index(6, 1, 8, "") == 0
    with pytest.raises(ConfigError, match="one process per GPU"):
        bound_gpu_index(4, 4, 0, "")
    with pytest.raises(ConfigError, match="--gpu-bind=single:1"):
        bound_gpu_index(5, 3, 8, "")


def test_local_world_size_from_torchrun_or_slurm():
    assert local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_world_size({"SLURM_TASKS_PER_NODE": "8(x2)"}) == 8
    assert local_world_size({}) == 0


def test_gloo_across_nodes_needs_a_routable_host_address_or_its_interface():
    two_nodes = {"SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)"}
    problem = gloo_address_problem(8, two_nodes, "127.0.1.1")
    assert problem and "GLOO_SOCKET_IFNAME" in problem and "127.0.1.1" in problem
    assert "does not resolve" in gloo_address_problem(8, two_nodes, None)
    assert gloo_address_problem(8, two_nodes, "10.1.2.3") is None
    assert gloo_address_problem(8, {**two_nodes, "GLOO_SOCKET_IFNAME": "ib0"}, "127.0.1.1") is None
    # one node: loopback is where the peers are
    assert gloo_address_problem(4, {"LOCAL_WORLD_SIZE": "4"}, "127.0.0.1") is None
    assert gloo_address_problem(8, {"LOCAL_WORLD_SIZE": "4"}, "127.0.0.1")  # torchrun, 2 nodes


def test_a_multi_node_group_with_a_loopback_host_is_refused_before_it_hangs(monkeypatch):
    """process_group stops with the ConfigError (the CLI's exit 2) before init_process_group."""
    from dcluster.core.config import DistributedConfig
    from dcluster.parallel.distributed import Env, process_group

    monkeypatch.setattr(distributed, "hostname_address", lambda: "127.0.1.1")
    monkeypatch.setattr(distributed.os, "environ", {"SLURM_NNODES": "2"})
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda *a, **k: pytest.fail("the group must not be created"))
    env = Env(rank=0, world_size=8, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="GLOO_SOCKET_IFNAME"):
        with process_group(env, DistributedConfig()):
            pass
