"""`dcluster train` as a real multi-process job (gloo, CPU): two ranks end to end, two ranks
on two "hosts" (network namespaces joined by a veth pair), and a rank that crashes."""
from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from dcluster.checkpoint import load_checkpoint
from dcluster.config import to_yaml
from helpers import assert_same_weights
from ranks import RankOutcome, describe, free_port, rank_command, run_ranks, torchrun_env


@pytest.fixture
def job_config(small_demo_config, tmp_path):
    """The small demo config as a YAML file for `dcluster train`, one thread per rank."""
    def write(*overrides: str) -> Path:
        path = tmp_path / "job.yaml"
        path.write_text(to_yaml(small_demo_config("threads=1", "distributed.timeout_s=60",
                                                  *overrides)))
        return path
    return write


def train_two_ranks(config: Path, logs: Path, *patches: str) -> list[RankOutcome]:
    port = free_port()
    outcomes = run_ranks([rank_command(*patches, "train", str(config))] * 2,
                         [torchrun_env(r, 2, "127.0.0.1", port) for r in range(2)], logs)
    assert [o.returncode for o in outcomes] == [0, 0], describe(outcomes)
    return outcomes


def final_checkpoint(tmp_path: Path, name: str, epochs: int) -> dict:
    return load_checkpoint(tmp_path / "runs" / name / "checkpoints"
                           / f"ckpt_e{epochs:06d}_i0000000.pt")


def test_two_ranks_train_two_epochs_with_equal_weights_and_resume_alike(job_config, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    outcomes = train_two_ranks(job_config("name=straight"), tmp_path / "straight",
                               "--save-weights", str(weights))
    finals = [torch.load(weights / f"rank{r}.pt") for r in range(2)]
    straight = final_checkpoint(tmp_path, "straight", 2)
    for name, tensor in straight["model"].items():  # BatchNorm buffers included
        assert torch.equal(finals[0][name], tensor) and torch.equal(finals[1][name], tensor), name
    labels = straight["clusters"]["labels"]
    assert labels.shape == (1797,) and labels.min() >= 0 and labels.max() < 10
    assert [h["epoch"] for h in straight["history"]] == [0.0, 1.0]
    assert "batch 16 per process, effective 32" in outcomes[0].output
    # one MLflow run, written by rank 0 alone
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"

    # the same run stopped after one epoch and resumed: both ranks continue from rank 0's
    # checkpoint, which holds every rank's state, and end where the uninterrupted run did
    train_two_ranks(job_config("name=resumed", "epochs=1"), tmp_path / "first")
    train_two_ranks(job_config("name=resumed"), tmp_path / "second")
    resumed = final_checkpoint(tmp_path, "resumed", 2)
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
    host. Skips where namespaces cannot be made (not root, no iproute2); always deleted."""
    if shutil.which("ip") is None:
        pytest.skip("two-host test needs iproute2's `ip` (apt-get install iproute2)")
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
                pytest.skip(f"cannot create a network namespace (root and iproute2 needed): "
                            f"{err.stderr.strip()}")
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


def test_two_hosts_train_one_epoch_over_a_veth_pair(two_hosts, job_config, tmp_path):
    config = job_config("name=two_hosts", "epochs=1", "tracking.enabled=false")
    master = two_hosts[0][2]
    commands = [["ip", "netns", "exec", namespace, *rank_command("train", str(config))]
                for namespace, _, _ in two_hosts]
    envs = [torchrun_env(rank, 2, master, 29500, GLOO_SOCKET_IFNAME=interface)
            for rank, (_, interface, _) in enumerate(two_hosts)]
    outcomes = run_ranks(commands, envs, tmp_path / "logs")
    assert [o.returncode for o in outcomes] == [0, 0], describe(outcomes)
    # the namespaces share nothing but the veth pair: the group can only have met over it
    assert f"process group: gloo, 2 ranks" in outcomes[0].output, describe(outcomes)
    checkpoint = load_checkpoint(tmp_path / "runs" / "two_hosts" / "checkpoints"
                                 / "ckpt_e000001_i0000000.pt")
    assert np.all(checkpoint["clusters"]["labels"] >= 0)
