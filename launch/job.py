"""The callables a Slurm job runs: one training run, checkpointable by submitit, or one
evaluation (`dcluster submit --eval`).

submitit pickles this object and runs it on every task of the job. On the timeout or
preemption signal the training loop (dcluster/runtime/stop.py) checkpoints at the next iteration
boundary on which all ranks agree and raises TrainingStopped; only then is the signal handed
to submitit's own handler, which on global rank 0 calls ``checkpoint`` (Checkpointable's:
requeue this same call) and requeues the job. The requeued call resumes from the newest valid
checkpoint of its run directory, with a fresh rendezvous (the port is derived from the job id
and the restart count, dcluster.parallel.distributed).
"""
from __future__ import annotations

import logging
import signal
from typing import Any, Sequence

import submitit

from dcluster.methods import load_config

log = logging.getLogger("dcluster.launch")


class TrainJob(submitit.helpers.Checkpointable):
    def __init__(self, config_path: str, overrides: Sequence[str]) -> None:
        self.config_path = config_path
        # The run directory was prepared at submission; every (re)start resumes from it.
        self.overrides = [*overrides, "resume=auto", "overwrite=false"]

    def __call__(self) -> Any:
        from dcluster.core.logs import configure_logging
        from dcluster.train import train
        from dcluster.runtime.stop import TrainingStopped, preempt_signal

        configure_logging()
        try:
            return train(load_config(self.config_path, self.overrides))
        except TrainingStopped as stopped:
            if stopped.signum != preempt_signal():
                raise  # SIGTERM: the job is being cancelled (or Slurm requeues it itself)
            log.warning("%s; handing over to submitit to requeue the job", stopped)
            # submitit's handler, back in place since the run ended: on global rank 0 it
            # requeues and exits; on the other ranks it returns, and so do they, because
            # exiting with an error could end rank 0 before it has requeued
            handler = signal.getsignal(stopped.signum)
            if callable(handler):
                handler(stopped.signum, None)
            return None


class EvalJob:
    """`dcluster eval PROTOCOL TARGET [overrides]` on every task of the job (the processes find
    each other as training's do). Not checkpointable: an evaluation keeps no partial state, so
    a stopped one is submitted again."""

    def __init__(self, protocol: str, target: str, overrides: Sequence[str]) -> None:
        self.protocol, self.target, self.overrides = protocol, target, list(overrides)

    def __call__(self) -> Any:
        """The JSON file rank 0 wrote (None on the other ranks)."""
        from dcluster.core.logs import configure_logging
        from dcluster.evaluation.protocols import evaluate
        from dcluster.methods import METHODS, Config

        configure_logging()
        done = evaluate(self.protocol, self.target, METHODS, Config, self.overrides)
        return None if done is None else str(done[1])
