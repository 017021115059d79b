"""The online monitor and the best checkpoint: the monitor's values are `dcluster eval`'s on
the same epoch's network, they survive a resume in the history, and best.pt is the epoch with
the best value whatever keep_last prunes."""
from pathlib import Path

import pytest
import torch

from dcluster.runtime.checkpoint import BEST_NAME, keep_as_best, load_checkpoint, load_latest, save_checkpoint
from dcluster.core.config import MONITOR_METRICS, ConfigError
from dcluster.evaluation.protocols import evaluate
from dcluster.methods import METHODS, Config, load_config
from dcluster.core.logs import configure_logging
from dcluster.evaluation.monitor import best_epoch
from dcluster.train import train
from helpers import TINY_MMDC

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BEST = "monitor_knn_top1"


def monitored_mmdc(data: Path, runs: Path, epochs: int):
    configure_logging()
    return train(load_config(CONFIGS / "mmdc_demo.yaml", [
        f"data.path={data}", f"runs_root={runs}", f"epochs={epochs}", "mmdc.refine_epochs=0",
        *TINY_MMDC, "optim.batch_size=64", "eval.batch_size=128", "tracking.enabled=false",
        "threads=1", "monitor.every=1", "checkpoint.keep_last=1",
        f"checkpoint.keep_best={BEST}"]))


def test_monitor_measures_what_eval_reports_and_best_checkpoint_survives_pruning_and_resume(
        digits_subset, tmp_path):
    runs = tmp_path / "runs"
    first = monitored_mmdc(digits_subset, runs, epochs=3)
    assert [set(MONITOR_METRICS) <= e.keys() for e in first.history] == [True] * 3
    checkpoints = first.run_dir / "checkpoints"
    best = checkpoints / BEST_NAME
    assert load_checkpoint(best)["epoch"] == best_epoch(first.history, BEST)
    assert len(list(checkpoints.glob("ckpt_*.pt"))) == 1  # keep_last=1 pruned the others

    # the monitor's numbers are those of `dcluster eval` on that epoch's checkpoint
    measured = first.history[best_epoch(first.history, BEST) - 1]
    knn, _ = evaluate("knn", best, METHODS, Config)
    clusters, _ = evaluate("clusters", best, METHODS, Config)
    assert knn.metrics["top1"] == pytest.approx(measured["monitor_knn_top1"], abs=1e-9)
    assert knn.metrics["top5"] == pytest.approx(measured["monitor_knn_top5"], abs=1e-9)
    assert clusters.metrics["nmi"] == pytest.approx(measured["monitor_kmeans_nmi"], abs=1e-6)
    assert clusters.metrics["acc"] == pytest.approx(measured["monitor_kmeans_acc"], abs=1e-6)

    # resumed for two more epochs: the measured epochs keep their values, best.pt follows
    second = monitored_mmdc(digits_subset, runs, epochs=5)
    assert second.history[:3] == first.history
    assert len(second.history) == 5
    assert load_checkpoint(best)["epoch"] == best_epoch(second.history, BEST)
    assert load_latest(checkpoints)[0]["epoch"] == 5  # resume never picks best.pt


def test_best_checkpoint_outlives_pruning_of_its_epoch(tmp_path):
    for epoch in (1, 2):
        path = save_checkpoint(tmp_path, {"epoch": epoch, "w": torch.full((3,), epoch)}, epoch,
                               keep_last=1)
        if epoch == 1:
            keep_as_best(path)
    assert not (tmp_path / "ckpt_e000001_i0000000.pt").exists()
    assert load_checkpoint(tmp_path / BEST_NAME)["epoch"] == 1
    assert load_latest(tmp_path)[0]["epoch"] == 2


def test_keep_best_names_a_monitored_metric(demo_digits):
    with pytest.raises(ConfigError, match="checkpoint.keep_best"):
        load_config(CONFIGS / "demo.yaml", [f"data.path={demo_digits}",
                                            "checkpoint.keep_best=loss", "monitor.every=1"])
    with pytest.raises(ConfigError, match="set monitor.every"):
        load_config(CONFIGS / "demo.yaml", [f"data.path={demo_digits}",
                                            f"checkpoint.keep_best={BEST}"])
