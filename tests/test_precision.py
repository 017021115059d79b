"""Mixed precision on the CPU (bf16 autocast runs there too) and the GPU check's behaviour on
a machine without a GPU.

The bf16 run is the small demo of tests/reference_runs.py (400 digits, 3 epochs) with
``optim.precision=bf16``; the fp32 reference is the same run in float32.
"""
from __future__ import annotations

import math

import pytest

from dcluster.core.config import ConfigError
from reference_runs import (EPOCHS, Run, assert_same_run, interrupted_command, new_dir,
                            recording, run_single, train_args)



def test_bf16_trains_with_a_finite_falling_loss_and_the_nmi_of_fp32(bf16_reference, reference):
    bf16, fp32 = bf16_reference.final()["history"], reference.final()["history"]
    assert len(bf16) == EPOCHS
    losses = [h["loss"] for h in bf16]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    # Three epochs on 400 images move NMI by about its noise (0.05-0.1 from one clustering
    # to the next, in either precision: the first clustering already differs, its features
    # were computed in bf16), so what is asserted is that bf16 stays where fp32 is: its
    # epochs' mean NMI against the classes and its last one within 0.06 of fp32's.
    def mean_nmi(history: list[dict]) -> float:
        return sum(h["nmi_classes"] for h in history) / len(history)

    assert abs(mean_nmi(bf16) - mean_nmi(fp32)) < 0.06
    assert abs(bf16[-1]["nmi_classes"] - fp32[-1]["nmi_classes"]) < 0.06
    assert "precision bf16" in bf16_reference.outputs[0]


def test_the_epoch_telemetry_is_recorded_positive_on_the_line_and_in_a_plot(bf16_reference):
    for record in bf16_reference.final()["history"]:
        for key in ("speed_features_img_s", "speed_train_img_s", "speed_data_wait",
                    "speed_host_mem_gb"):
            assert record[key] > 0, key
        assert 0 < record["speed_data_wait"] < 1
        assert "speed_gpu_mem_gb" not in record  # no GPU here
    assert "training" in bf16_reference.outputs[0] and " img/s (data wait " in \
        bf16_reference.outputs[0]
    assert (bf16_reference.root / "plots" / "throughput.png").stat().st_size > 0


def test_a_stopped_and_resumed_bf16_run_ends_equal_to_the_uninterrupted_one(
        bf16_reference, digits_subset, tmp_path):
    args = train_args(digits_subset, tmp_path / "runs", "bf16_stopped", "optim.precision=bf16")
    run = Run(tmp_path / "runs" / "bf16_stopped", new_dir(tmp_path / "orders"))
    stopped = run_single(interrupted_command("train:1:5", "SIGUSR2", run.orders, args),
                         tmp_path / "stopped")
    assert stopped.returncode == 140, stopped.output[-4000:]
    assert "stopped on SIGUSR2 in epoch 2 after 5 iteration(s)" in stopped.output
    resumed = run_single(recording(run.orders, args), tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "inside epoch 2, after its iteration 5" in resumed.output
    assert_same_run(bf16_reference, run)

def test_an_unknown_precision_is_refused_naming_the_key(small_demo_config):
    with pytest.raises(ConfigError, match="optim.precision.*'fp8'.*fp32, bf16, fp16"):
        small_demo_config("optim.precision=fp8")
    with pytest.raises(ConfigError, match="checkpoint.poll_every.*must not be negative"):
        small_demo_config("checkpoint.poll_every=-1")
