"""DeepCluster and MMDC on the real local Slurm cluster, through the launcher: a 2-task
`dcluster submit` run ends with the weights of the same run made locally with two processes
(the session's reference runs, tests/reference_runs.py), and so does a run interrupted by the
timeout signal (mid-epoch, then mid-clustering: it checkpoints, requeues itself and resumes)
and a run cancelled with scancel and submitted again.

Jobs are observed through the files they write and squeue (there is no accounting store, so
sacct and submitit's job states are of no use here); every wait is bounded.
"""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import submitit
import torch
from mlflow import MlflowClient

import interrupts
from dcluster.runtime.checkpoint import load_checkpoint, load_latest
from dcluster.core.config import to_yaml
from dcluster.methods import load_config
from dcluster.core.rundir import prepare_run_dir
from helpers import SMALL_DEMO, TINY_MMDC, assert_same_weights
from interrupts import clusterings, interrupt_at, record_orders
from launch.job import TrainJob
from launch.submit import build_executor
from ranks import REPO
from reference_runs import (EPOCHS, MMDC_BATCH, MMDC_EPOCHS, MMDC_OPTIMIZERS, MMDC_REFINE, Run,
                            assert_same_run)
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm

# The submitted job runs `python -m submitit.core._submit`, which cannot import the test
# modules by name: pickle what it needs of them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(interrupts)

JOB_TIMEOUT_S = 240  # one job's run on the 2-CPU node, start-up included
SIGNAL_SEEN_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def job_yaml(digits_subset, tmp_path_factory) -> Path:
    """The demo config, shrunk, with its `slurm:` section for the local cluster: 2 CPU tasks."""
    return write_job_yaml(tmp_path_factory.mktemp("slurm_train"), "demo.yaml", [
        f"data.path={digits_subset}", f"epochs={EPOCHS}", *SMALL_DEMO, "eval.class_kmeans=false"])


SLURM_JOB = ("threads=1", "tracking.plots=false", "distributed.timeout_s=120",
             "slurm.partition=debug", "slurm.tasks_per_node=2", "slurm.cpus_per_task=1",
             "slurm.mem_gb=1", "slurm.time_min=10")


def write_job_yaml(root: Path, preset: str, overrides: list[str]) -> Path:
    """A preset with ``overrides`` and the `slurm:` section for the local cluster (2 CPU
    tasks) as one YAML file, with runs_root beside it."""
    cfg = load_config(REPO / "configs" / preset, [*overrides, f"runs_root={root / 'runs'}",
                                                  *SLURM_JOB])
    path = root / "job.yaml"
    path.write_text(to_yaml(cfg))
    return path


@pytest.fixture(scope="module")
def mmdc_job_yaml(digits_subset, tmp_path_factory) -> Path:
    """The MMDC reference run's config (reference_runs.mmdc_train_args) for the cluster."""
    return write_job_yaml(tmp_path_factory.mktemp("slurm_mmdc"), "mmdc_demo.yaml", [
        f"data.path={digits_subset}", f"epochs={MMDC_EPOCHS}", f"mmdc.refine_epochs={MMDC_REFINE}",
        "mmdc.rotation=true", f"optim.batch_size={MMDC_BATCH}", *TINY_MMDC])


def runs_root(job_yaml: Path) -> Path:
    return job_yaml.parent / "runs"


def checkpoints(job_yaml: Path, name: str) -> Path:
    return runs_root(job_yaml) / name / "checkpoints"


def final_weights(job_yaml: Path, name: str, epochs: int = EPOCHS) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoints(job_yaml, name) / f"ckpt_e{epochs:06d}_i0000000.pt")["model"]


@pytest.fixture(scope="module")
def local_run(pair_reference) -> tuple[dict[str, torch.Tensor], Path]:
    """The same run with two local processes (torchrun's variables, gloo): its final weights,
    and the training orders each rank was given, epoch by epoch."""
    return pair_reference.final()["model"], pair_reference.orders


def submit(job_yaml: Path, name: str) -> str:
    """`dcluster submit` as a user runs it; returns the job id it prints."""
    out = subprocess.run([sys.executable, "-m", "dcluster", "submit", str(job_yaml), f"name={name}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"^job id:\s+(\d+)$", out.stdout, re.MULTILINE)
    assert job_id, out.stdout
    return job_id[1]


def wait_completed(cluster: SlurmCluster, job_id: str, done: Path) -> None:
    """Until the job's final checkpoint is committed and Slurm calls the job COMPLETED."""
    cluster.wait_for(done.exists, timeout=JOB_TIMEOUT_S, what=f"job {job_id} to write {done.name}")
    cluster.wait_for(lambda: cluster.squeue_states(job_id) == ["COMPLETED"], timeout=60,
                     what=f"job {job_id} to be COMPLETED in squeue")


def release_after(cluster: SlurmCluster, job_id: str, marker: Path, what: str) -> None:
    """Once the stopped job has committed the checkpoint ``marker``, let its requeued self
    start."""
    cluster.wait_for(marker.exists, timeout=JOB_TIMEOUT_S, what=what)
    cluster.release_requeued(job_id)


def committed(directory: Path, epoch: int, step: int) -> Path:
    """The commit marker of checkpoint (epoch, step): it exists once the checkpoint is whole."""
    return directory / f"ckpt_e{epoch:06d}_i{step:07d}.pt.sha256"


def cancel(cluster: SlurmCluster, job_id: str) -> None:
    cluster.command("scancel", job_id)


def test_submitted_two_task_run_matches_the_local_run(slurm_cluster, job_yaml, local_run):
    job_id = submit(job_yaml, "submitted")
    try:
        wait_completed(slurm_cluster, job_id,
                       committed(checkpoints(job_yaml, "submitted"), EPOCHS, 0))
    finally:
        cancel(slurm_cluster, job_id)  # a no-op once it has completed
    assert_same_weights(local_run[0], final_weights(job_yaml, "submitted"))


def send_timeout_signal() -> None:
    """From rank 0 inside the job: the signal Slurm sends before the time limit, to every
    task of the job, sent the same way (scancel --signal to the job's steps). Returns once
    this process's stop request has recorded it, so the interruption lands where asked: the
    signal's arrival wakes a select on Python's signal wake-up pipe."""
    request = signal.getsignal(signal.SIGUSR2).__self__  # the run's dcluster.runtime.stop.StopRequest
    woken, wake = os.pipe()
    os.set_blocking(wake, False)
    previous = signal.set_wakeup_fd(wake)
    try:
        subprocess.run(["scancel", "--signal=USR2", os.environ["SLURM_JOB_ID"]], check=True,
                       timeout=30)
        while not request.signum:
            ready, _, _ = select.select([woken], [], [], SIGNAL_SEEN_TIMEOUT_S)
            assert ready, "the timeout signal never reached rank 0"
            os.read(woken, 512)
    finally:
        signal.set_wakeup_fd(previous)
        os.close(woken)
        os.close(wake)


class InterruptedTrainJob(TrainJob):
    """The launcher's job, interrupted by the timeout signal on its restart R at
    ``points[R]`` (tests/interrupts.py), and recording each rank's training orders."""

    def __init__(self, config_path: str, overrides: list[str], points: dict[int, str],
                 orders: str) -> None:
        super().__init__(config_path, overrides)
        self.points = points
        self.orders = orders

    def __call__(self):
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        rank = submitit.JobEnvironment().global_rank
        record_orders(Path(self.orders), rank)
        if rank == 0 and restarts in self.points:
            interrupt_at(self.points[restarts], send_timeout_signal)
        return super().__call__()


def submit_interrupted(job_yaml: Path, name: str, points: dict[int, str],
                       *overrides: str) -> tuple[submitit.Job, Path]:
    """An InterruptedTrainJob submitted as `dcluster submit` would (run directory prepared
    first, the executor of the config's `slurm:` section); returns it and its orders folder."""
    overrides = (f"name={name}", *overrides)
    cfg = load_config(job_yaml, list(overrides))
    orders = job_yaml.parent / f"orders-{name}"
    prepare_run_dir(cfg)
    executor = build_executor(cfg, runs_root(job_yaml) / name / "slurm")
    return executor.submit(InterruptedTrainJob(str(job_yaml), list(overrides), points,
                                               str(orders))), orders


def test_timeout_signal_mid_epoch_and_mid_clustering_requeues_and_ends_alike(
        slurm_cluster, job_yaml, local_run):
    name = "interrupted"
    # restart 0: just before the 5th batch of epoch 1; restart 1 (resumed inside epoch 1):
    # during its first clustering, that of epoch 2
    job, orders = submit_interrupted(job_yaml, name, {0: "train:1:5", 1: "clustering:0"})
    ckpts = checkpoints(job_yaml, name)
    try:
        release_after(slurm_cluster, job.job_id, committed(ckpts, 1, 6),
                      "the checkpoint after iteration 5 of epoch 1")
        release_after(slurm_cluster, job.job_id, committed(ckpts, 2, 1),
                      "the checkpoint of epoch 2 right after its clustering")
        wait_completed(slurm_cluster, job.job_id, committed(ckpts, EPOCHS, 0))
    finally:
        cancel(slurm_cluster, job.job_id)

    weights, local_orders = local_run
    assert_same_weights(weights, final_weights(job_yaml, name))
    # every rank was given, over the three runs, exactly the images of the uninterrupted run,
    # in the same order: none skipped, none repeated in the interrupted epochs
    for rank in range(2):
        for epoch in range(EPOCHS):
            file = f"rank{rank}-epoch{epoch}.txt"
            assert (orders / file).read_text() == (local_orders / file).read_text(), file
    log = (runs_root(job_yaml) / name / "train.log").read_text()
    assert log.count("received SIGUSR2") >= 2
    assert "inside epoch 2, after its iteration 5" in log
    assert "inside epoch 3, after its clustering" in log
    assert clusterings(orders) == EPOCHS  # epoch 2 was not clustered twice
    client = MlflowClient(f"sqlite:///{runs_root(job_yaml) / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_requeues_stop_at_the_cap_with_the_checkpoint_kept(slurm_cluster, job_yaml, local_run):
    """slurm.max_requeues counts timeouts (as submitit does: preemptions are not capped). With
    a 2-minute limit every signal reads as a timeout to submitit, so with a cap of 0 the
    first one checkpoints and ends the job instead of requeuing it."""
    name = "capped"
    job, _ = submit_interrupted(job_yaml, name, {0: "train:1:5"}, "slurm.max_requeues=0",
                                "slurm.time_min=2", "slurm.signal_delay_s=5")
    ckpts = checkpoints(job_yaml, name)
    try:
        slurm_cluster.wait_for(lambda: slurm_cluster.squeue_states(job.job_id) == ["FAILED"],
                               timeout=JOB_TIMEOUT_S, what=f"job {job.job_id} to end, not requeued")
    finally:
        cancel(slurm_cluster, job.job_id)
    latest = load_latest(ckpts)
    assert latest is not None and latest[1].name == "ckpt_e000001_i0000006.pt"
    assert latest[0]["iteration"] == 6
    errors = "".join(p.read_text() for p in (runs_root(job_yaml) / name / "slurm").glob("*_0_log.*"))
    assert "timed-out too many times" in errors
    assert "resuming from" not in (runs_root(job_yaml) / name / "train.log").read_text()


def test_scancel_leaves_a_checkpoint_a_new_submission_resumes(slurm_cluster, job_yaml, local_run):
    name = "cancelled"
    ckpts = checkpoints(job_yaml, name)
    job_id = submit(job_yaml, name)
    try:
        slurm_cluster.wait_for(committed(ckpts, 1, 0).exists, timeout=JOB_TIMEOUT_S,
                               what=f"job {job_id} to finish its first epoch")
        cancel(slurm_cluster, job_id)
        slurm_cluster.wait_for(lambda: slurm_cluster.squeue_states(job_id) in (["CANCELLED"], []),
                               timeout=90, what=f"job {job_id} to be cancelled")
    finally:
        cancel(slurm_cluster, job_id)
    found = load_latest(ckpts)
    assert found is not None and not committed(ckpts, EPOCHS, 0).exists()
    payload, path = found
    assert payload["epoch"] >= 1, path

    job_id = submit(job_yaml, name)  # the same command again: it resumes in the run directory
    try:
        wait_completed(slurm_cluster, job_id, committed(ckpts, EPOCHS, 0))
    finally:
        cancel(slurm_cluster, job_id)
    assert_same_weights(local_run[0], final_weights(job_yaml, name))
    assert f"resuming from {path}" in (runs_root(job_yaml) / name / "train.log").read_text()


def test_sbatch_template_forwards_the_timeout_signal_and_requeues(slurm_cluster, job_yaml,
                                                                   local_run, tmp_path):
    """slurm/dcluster.sbatch as a user submits it, its #SBATCH lines overridden for the
    one-node CPU cluster: the signal reaches its batch shell (as --signal=B:USR2 sends it), the
    trap forwards it to the tasks, which checkpoint and exit 140, and the script requeues."""
    name = "sbatch"
    ckpts = checkpoints(job_yaml, name)
    venv_bin = Path(sys.executable).parent  # `srun python` must be this environment's
    out = slurm_cluster.command(
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
        "--cpus-per-task=1", "--mem=2G", "--time=10", "--partition=debug",
        f"--output={tmp_path / 'slurm-%j.out'}", f"--chdir={REPO}",
        f"--export=ALL,PATH={venv_bin}:{os.environ['PATH']},DCLUSTER_CONFIG={job_yaml},"
        f"DATA_PATH={load_config(job_yaml).data.path}",
        str(REPO / "slurm" / "dcluster.sbatch"), f"name={name}")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    try:
        slurm_cluster.wait_for(committed(ckpts, 1, 0).exists, timeout=JOB_TIMEOUT_S,
                               what=f"job {job_id} to finish its first epoch")
        signalled = slurm_cluster.command("scancel", "--signal=USR2", "--batch", job_id)
        assert signalled.returncode == 0, signalled.stderr
        slurm_cluster.release_requeued(job_id)
        wait_completed(slurm_cluster, job_id, committed(ckpts, EPOCHS, 0))
    finally:
        cancel(slurm_cluster, job_id)
    assert_same_weights(local_run[0], final_weights(job_yaml, name))
    log = (runs_root(job_yaml) / name / "train.log").read_text()
    assert "received SIGUSR2" in log and "resuming from" in log


def test_mmdc_timeout_signal_mid_epoch_requeues_and_ends_like_the_local_run(
        slurm_cluster, mmdc_job_yaml, mmdc_pair_reference):
    """MMDC under `dcluster submit` stops, requeues and resumes as DeepCluster does: the
    signal lands before the 9th training batch of epoch 1, the refinement epoch (the rotation
    pass's 2nd, after the 7 of the clustering pass), so the checkpoint is the one after 7 + 2
    iterations."""
    name = "mmdc"
    job, orders = submit_interrupted(mmdc_job_yaml, name, {0: "train:1:9"})
    ckpts = checkpoints(mmdc_job_yaml, name)
    epochs = MMDC_EPOCHS + MMDC_REFINE
    try:
        release_after(slurm_cluster, job.job_id, committed(ckpts, 1, 10),
                      "the checkpoint after iteration 2 of epoch 1's rotation pass")
        wait_completed(slurm_cluster, job.job_id, committed(ckpts, epochs, 0))
    finally:
        cancel(slurm_cluster, job.job_id)
    assert_same_run(mmdc_pair_reference, Run(runs_root(mmdc_job_yaml) / name, orders, epochs),
                    MMDC_OPTIMIZERS)
    log = (runs_root(mmdc_job_yaml) / name / "train.log").read_text()
    assert "received SIGUSR2" in log and "inside epoch 2, after its iteration 9" in log
