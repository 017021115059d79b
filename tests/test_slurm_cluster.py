"""Smoke tests of the local Slurm cluster through submitit: multi-task jobs, and requeue of a
Checkpointable job after the timeout signal, which the launcher's resume logic relies on.

Job outcomes are observed through marker files the jobs write: without an accounting store
sacct fails and submitit's job states read UNKNOWN, so every wait is a bounded poll.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from slurm_cluster import SlurmCluster

log = logging.getLogger(__name__)

pytestmark = pytest.mark.slurm

# Jobs run `python -m submitit.core._submit`, which cannot import this test module by name:
# pickle its functions and classes by value instead.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# The first run of the checkpointable job blocks at most this long: the test releases it
# when it fails, but a test process that dies must not leave the node busy for good.
BLOCK_LIMIT_S = 180


def _mark(path: Path, text: str) -> None:
    """Writes a marker atomically, so a poller never sees it half written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def report_rank(marker_dir: str) -> int:
    """Job body: records which global rank ran it and returns that rank."""
    rank = submitit.JobEnvironment().global_rank
    _mark(Path(marker_dir) / f"rank{rank}.done", str(rank))
    return rank


class BlockUntilRequeued(submitit.helpers.Checkpointable):
    """On its first run, waits to be interrupted; once requeued, finishes at once.

    submitit's default checkpoint() resubmits the same callable with the same arguments,
    so the restart is told apart by SLURM_RESTART_COUNT, which Slurm sets on requeue.
    """

    def __call__(self, marker_dir: str) -> int:
        rank = submitit.JobEnvironment().global_rank
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        markers = Path(marker_dir)
        if restarts == 0:
            # submitit installed its signal handlers before calling us: from this marker on,
            # the timeout signal checkpoints and requeues instead of killing the task.
            _mark(markers / f"started-rank{rank}", "")
            deadline = time.monotonic() + BLOCK_LIMIT_S
            while not (markers / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        _mark(markers / f"restart{restarts}-rank{rank}", str(restarts))
        return restarts


def _executor(folder: Path) -> submitit.AutoExecutor:
    """A 2-task single-node executor on the local cluster's partition."""
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(nodes=1, slurm_ntasks_per_node=2, cpus_per_task=1,
                               mem_gb=1, timeout_min=10, slurm_partition="debug")
    return executor


def _wait_completed(cluster: SlurmCluster, job: submitit.Job) -> None:
    """Waits until Slurm itself calls the job COMPLETED: the tasks' result files appear
    before the batch step has exited, and a job still finishing must not be cancelled by
    the cluster's shutdown, nor count as a success if Slurm saw it fail."""
    cluster.wait_for(lambda: cluster.squeue_states(job.job_id) == ["COMPLETED"], timeout=30,
                     what=f"job {job.job_id} to be COMPLETED in squeue")


def test_two_tasks_run_with_both_ranks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    job = _executor(tmp_path / "submitit").submit(report_rank, str(markers))
    log.info("submitted job %s", job.job_id)

    slurm_cluster.wait_for(lambda: all((markers / f"rank{r}.done").exists() for r in (0, 1)),
                           timeout=60, what=f"both ranks of job {job.job_id} to run")
    assert sorted(int((markers / f"rank{r}.done").read_text()) for r in (0, 1)) == [0, 1]
    _wait_completed(slurm_cluster, job)
    assert sorted(job.results()) == [0, 1]


def test_checkpointable_job_requeues_after_timeout_signal(slurm_cluster: SlurmCluster,
                                                          tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    job = _executor(tmp_path / "submitit").submit(BlockUntilRequeued(), str(markers))
    log.info("submitted job %s", job.job_id)
    try:
        slurm_cluster.wait_for(
            lambda: all((markers / f"started-rank{r}").exists() for r in (0, 1)),
            timeout=60, what=f"both ranks of job {job.job_id} to start")

        job._interrupt(timeout=True)  # the timeout signal: rank 0 checkpoints and requeues

        slurm_cluster.release_requeued(job.job_id)
        slurm_cluster.wait_for(
            lambda: all((markers / f"restart1-rank{r}").exists() for r in (0, 1)),
            timeout=90, what=f"both ranks of job {job.job_id} to run again")
        _wait_completed(slurm_cluster, job)
    finally:
        _mark(markers / "release", "")  # let a first run still blocking end on its own

    assert job.results() == [1, 1]
    # The first run never got past its block: the interruption, not the release, ended it.
    assert not (markers / "restart0-rank0").exists()
    assert not (markers / "restart0-rank1").exists()
