"""The stop request in one process: which signals it records, that it gives the handlers it
replaced back, and when the iteration poll asks for a periodic checkpoint."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

import dcluster.runtime.stop
from dcluster.parallel.collectives import Comm
from dcluster.core.config import CheckpointConfig, ConfigError
from dcluster.parallel.distributed import Env
from dcluster.runtime.stop import StopPoints, StopRequest, TrainingStopped, preempt_signal


def single_comm() -> Comm:
    return Comm(Env(0, 1, 0, torch.device("cpu")))


def test_preempt_signal_follows_submitits_variable(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert preempt_signal() == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert preempt_signal() == signal.SIGUSR1
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "SIGTERM")
    assert preempt_signal() == signal.SIGTERM
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "NOPE")
    with pytest.raises(ConfigError, match="NOPE"):
        preempt_signal()


def test_a_signal_is_recorded_not_acted_on_and_handlers_are_given_back(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    seen = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with StopRequest() as request:
            assert request.signum == 0
            os.kill(os.getpid(), signal.SIGUSR2)  # the handler runs before the next line
            assert request.signum == signal.SIGUSR2
            assert seen == []  # recorded only: the previous handler is not called
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR2)
            assert request.signum == signal.SIGTERM  # the job is ending: TERM wins
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]  # back in place after the run
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_iteration_rule_and_rank_zeros_clock_ask_for_periodic_checkpoints(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(dcluster.runtime.stop.time, "monotonic", lambda: clock[0])
    request = StopRequest()
    every_5 = StopPoints(request, CheckpointConfig(every_iterations=5), single_comm())
    assert [every_5.local_flags(i)[1] for i in range(1, 11)] == [0, 0, 0, 0, 1] * 2

    timed = StopPoints(request, CheckpointConfig(every_minutes=2.0), single_comm())
    clock[0] += 119.0
    assert timed.local_flags(1) == [0, 0]
    clock[0] += 1.0
    assert timed.local_flags(2) == [0, 1]
    timed.saved()  # the clock starts again at each checkpoint
    assert timed.local_flags(3) == [0, 0]

    off = StopPoints(request, CheckpointConfig(), single_comm())
    clock[0] += 1e6
    assert off.local_flags(5) == [0, 0]
    request.signum = signal.SIGUSR2
    assert off.local_flags(6) == [signal.SIGUSR2, 0]
    assert off.agreed_stop() == signal.SIGUSR2  # one process: its own flag


def test_training_stopped_exits_like_the_signal_would():
    stopped = TrainingStopped(signal.SIGUSR2, Path("runs/x/checkpoints/ckpt_e000003_i0000011.pt"), 3,
                              10)
    assert stopped.exit_code == 140
    # epoch index 3 (from 0, as the loop counts) is the 4th epoch, which the checkpoint name
    # ckpt_e000003 (3 epochs done) is inside
    assert "SIGUSR2" in str(stopped) and "epoch 4 after 10 iteration(s)" in str(stopped)
    assert "ckpt_e000003_i0000011.pt" in str(stopped)
