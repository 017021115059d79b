"""A preset states the paper's global batch and lr, and trains at them on any number of GPUs:
optim.global_batch is divided over the processes, logged at start, recorded in checkpoints,
and a resume at another global batch is refused naming the key that keeps it."""
from __future__ import annotations

import pytest

from dcluster.core.batch import BatchPlan, plan_batch
from dcluster.core.config import ConfigError
from dcluster.methods import load_config
from dcluster.runtime.checkpoint import CheckpointError, load_checkpoint
from dcluster.runtime.run_state import check_global_batch
from dcluster.train import train
from helpers import CONFIGS, small_demo

PAPER = {"deepcluster_alexnet_imagenet.yaml": (256, 0.05),
         "deepcluster_vgg16_imagenet.yaml": (256, 0.05),
         "deepcluster_resnet50_imagenet.yaml": (256, 0.05),
         "mmdc_resnet18.yaml": (128, 0.05)}


@pytest.mark.parametrize("preset", sorted(PAPER))
@pytest.mark.parametrize("gpus", [1, 8, 32])
def test_a_preset_trains_at_the_papers_batch_and_lr_on_any_gpu_count(preset, gpus, tmp_path):
    cfg = load_config(CONFIGS / preset, [f"data.path={tmp_path}"])
    batch, lr = PAPER[preset]
    plan = plan_batch(cfg.optim, gpus)
    assert (plan.global_batch, plan.per_process * gpus, plan.lr) == (batch, batch, lr)


def test_a_global_batch_the_processes_cannot_share_equally_is_refused_naming_it(tmp_path):
    cfg = load_config(CONFIGS / "deepcluster_alexnet_imagenet.yaml", [f"data.path={tmp_path}"])
    with pytest.raises(ConfigError, match="'optim.global_batch' = 256.*multiple of the 3"):
        plan_batch(cfg.optim, 3)


def test_without_a_global_batch_the_per_process_batch_and_lr_scaling_apply(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", [f"data.path={tmp_path}", "optim.batch_size=16",
                                              "optim.lr_scaling=linear"])
    assert plan_batch(cfg.optim, 4) == BatchPlan(
        64, 16, 4, pytest.approx(0.04), "optim.batch_size per process, lr scaling linear")


def test_lr_scaling_is_refused_beside_a_global_batch(tmp_path):
    with pytest.raises(ConfigError, match="'optim.lr_scaling' = 'linear'"):
        load_config(CONFIGS / "demo.yaml", [f"data.path={tmp_path}", "optim.global_batch=32",
                                            "optim.lr_scaling=linear"])


def test_a_resume_on_twice_the_gpus_keeps_the_global_batch_or_is_refused():
    """A run of 2 processes at 16 each, resumed on 4: per-process 16 would make 64."""
    payload = {"global_batch": 32}
    check_global_batch(payload, BatchPlan(32, 8, 4, 0.05, "global"), "ckpt.pt")
    with pytest.raises(CheckpointError, match="global batch of 32.*optim.global_batch=32"):
        check_global_batch(payload, BatchPlan(64, 16, 4, 0.05, "per process"), "ckpt.pt")
    check_global_batch({}, BatchPlan(64, 16, 4, 0.05, "per process"), "old.pt")  # no record


def test_a_run_logs_and_records_its_global_batch_and_a_resume_at_another_is_refused(
        digits_subset, tmp_path):
    def config(*overrides: str):  # the 400-image subset: mechanics, not what is learnt
        return small_demo(digits_subset, tmp_path / "runs", "tracking.enabled=false", *overrides)

    first = train(config("epochs=1", "optim.batch_size=16"))
    assert ("global batch 16 = 16 per process x 1 process(es), lr 0.01"
            in (first.run_dir / "train.log").read_text())
    assert first.checkpoint is not None
    assert load_checkpoint(first.checkpoint)["global_batch"] == 16
    with pytest.raises(CheckpointError, match="optim.global_batch=16"):
        train(config("epochs=2", "optim.global_batch=32"))
    # the same global batch, stated as such: the run goes on
    second = train(config("epochs=2", "optim.global_batch=16"))
    assert load_checkpoint(second.checkpoint)["epoch"] == 2
