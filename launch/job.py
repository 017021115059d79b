"""The callable a Slurm job runs: one DeepCluster training, checkpointable by submitit.

submitit pickles this object, runs it on every task of the job, and on the timeout or
preemption signal calls ``checkpoint`` (Checkpointable's: requeue this same call) on global
rank 0. The training loop writes its checkpoints itself, atomically, so requeuing the same
call is all that is needed: it resumes from the newest valid checkpoint of its run directory.
"""
from __future__ import annotations

from typing import Sequence

import submitit

from dcluster.config import load_config


class TrainJob(submitit.helpers.Checkpointable):
    def __init__(self, config_path: str, overrides: Sequence[str]) -> None:
        self.config_path = config_path
        # The run directory was prepared at submission; every (re)start resumes from it.
        self.overrides = [*overrides, "resume=auto", "overwrite=false"]

    def __call__(self):
        from dcluster.logs import configure_logging
        from dcluster.methods import run_method

        configure_logging()
        return run_method(load_config(self.config_path, self.overrides))
