"""`dcluster train` as a real multi-process job (gloo, CPU): two ranks end to end, two ranks
on two "hosts" (network namespaces joined by a veth pair), and a rank that crashes."""
from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import torch

from dcluster.runtime.checkpoint import load_checkpoint
from dcluster.core.config import to_yaml
from helpers import assert_same_weights, small_demo
from ranks import describe, free_port, rank_command, run_ranks, torchrun_env
from reference_runs import EPOCHS, IMAGES, run_pair, train_args
from required import unavailable


@pytest.fixture
def job_config(digits_subset, tmp_path):
    """The small demo config on 400 digits as a YAML file for `dcluster train`, one thread
    per rank."""
    def write(*overrides: str) -> Path:
        path = tmp_path / "job.yaml"
        path.write_text(to_yaml(small_demo(digits_subset, tmp_path / "runs", "threads=1",
                                           "distributed.timeout_s=60", *overrides)))
        return path
    return write


def final_checkpoint(tmp_path: Path, name: str, epochs: int) -> dict:
    return load_checkpoint(tmp_path / "runs" / name / "checkpoints"
                           / f"ckpt_e{epochs:06d}_i0000000.pt")


def test_two_ranks_end_with_equal_weights_and_resume_alike_across_sessions(
        pair_reference, digits_subset, tmp_path):
    """The session's 2-rank reference run: every rank ends with the checkpointed weights;
    the same run stopped after its first epoch and started again (two sessions) ends where
    it did: both ranks continue from rank 0's checkpoint, which holds every rank's state."""
    straight = pair_reference.final()
    weights = pair_reference.root.parent.parent / "weights"
    for rank in range(2):  # BatchNorm buffers included
        assert_same_weights(straight["model"], torch.load(weights / f"rank{rank}.pt"),
                            f"rank {rank}'s model")
    labels = straight["clusters"]["labels"]
    assert labels.shape == (IMAGES,) and labels.min() >= 0 and labels.max() < 10
    assert [h["epoch"] for h in straight["history"]] == [float(e) for e in range(1, EPOCHS + 1)]
    assert "global batch 32 = 16 per process x 2 process(es)" in pair_reference.outputs[0]

    for session, epochs in enumerate((1, EPOCHS)):
        outcomes = run_pair([], train_args(digits_subset, tmp_path / "runs", "resumed",
                                           f"epochs={epochs}"), tmp_path / f"session{session}")
        assert [o.returncode for o in outcomes] == [0, 0], describe(outcomes)
    resumed = final_checkpoint(tmp_path, "resumed", EPOCHS)
    assert_same_weights(straight["model"], resumed["model"], "the run that was not resumed")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


def test_a_failing_rank_ends_the_whole_job(job_config, tmp_path):
    config = job_config("name=crash", "epochs=1", "distributed.timeout_s=30")
    port = free_port()
    outcomes = run_ranks([rank_command("--fail-on-rank", "1", "train", str(config))] * 2,
                         [torchrun_env(r, 2, "127.0.0.1", port) for r in range(2)], tmp_path / "logs",
                         timeout=180)
    assert all(o.returncode != 0 for o in outcomes), describe(outcomes)
    message = "rank 1 of 2 failed: RuntimeError: injected failure on rank 1"
    assert message in outcomes[1].output, describe(outcomes)
    assert message in (tmp_path / "runs" / "crash" / "train.log").read_text()
    assert "rank 0 of 2 failed" in outcomes[0].output, describe(outcomes)


@pytest.fixture
def two_hosts() -> Iterator[list[tuple[str, str, str]]]:
    """Two network namespaces joined by a veth pair: [(namespace, interface, address)] per
    host. Skips where namespaces cannot be made (not root, no iproute2), fails there under
    DCLUSTER_REQUIRE_NETNS=1 (tests/required.py); always deleted."""
    if shutil.which("ip") is None:
        unavailable("netns", "the two-host test needs iproute2's `ip` (apt-get install iproute2)")
    tag = uuid.uuid4().hex[:6]
    hosts = [(f"dc{tag}a", f"vd{tag}a", "10.213.7.1"), (f"dc{tag}b", f"vd{tag}b", "10.213.7.2")]
    made: list[str] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)

    try:
        for namespace, _, _ in hosts:
            try:
                ip("netns", "add", namespace)
            except subprocess.CalledProcessError as err:
                unavailable("netns", "cannot create a network namespace (root and iproute2 "
                                     f"needed): {err.stderr.strip()}")
            made.append(namespace)
        (ns_a, if_a, _), (ns_b, if_b, _) = hosts
        ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        for namespace, interface, address in hosts:
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            ip("-n", namespace, "link", "set", interface, "up")
            ip("-n", namespace, "link", "set", "lo", "up")  # rank 0 reaches its own address
        yield hosts
    finally:
        for namespace in made:  # deleting a namespace deletes its end of the pair, and the pair
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, timeout=30)


def test_two_hosts_over_a_veth_pair_train_the_weights_of_two_ranks_on_one_host(
        two_hosts, pair_reference, digits_subset, tmp_path):
    """The session's 2-rank reference run, its first epoch on two "hosts": the weights after
    it are those the reference checkpointed after its epoch 1 (epochs= only sets where a run
    ends: test_two_ranks_end_with_equal_weights_and_resume_alike_across_sessions)."""
    args = train_args(digits_subset, tmp_path / "runs", "two_hosts", "epochs=1")
    master = two_hosts[0][2]
    commands = [["ip", "netns", "exec", namespace, *rank_command(*args)]
                for namespace, _, _ in two_hosts]
    envs = [torchrun_env(rank, 2, master, 29500, GLOO_SOCKET_IFNAME=interface)
            for rank, (_, interface, _) in enumerate(two_hosts)]
    outcomes = run_ranks(commands, envs, tmp_path / "logs")
    assert [o.returncode for o in outcomes] == [0, 0], describe(outcomes)
    # the namespaces share nothing but the veth pair: the group can only have met over it
    assert "process group: gloo, 2 ranks" in outcomes[0].output, describe(outcomes)
    two_hosts_run = final_checkpoint(tmp_path, "two_hosts", 1)
    assert_same_weights(load_checkpoint(pair_reference.checkpoint(1))["model"],
                        two_hosts_run["model"], "the 2-rank run on one host")
