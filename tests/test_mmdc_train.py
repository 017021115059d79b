"""MMDC end to end on the demo digits: it trains, checkpoints, and a run killed before its
refinement stage resumes to the same weights and targets as an uninterrupted one."""
import numpy as np
import pytest

from dcluster.runtime.checkpoint import load_checkpoint
from dcluster.methods import load_config
from dcluster.core.logs import configure_logging
from dcluster.methods.mmdc.method import MMDC, lr_at
from dcluster.train import train
from helpers import CONFIGS, TINY_MMDC, assert_same_weights


@pytest.fixture
def tiny_mmdc(digits_subset, tmp_path):
    """configs/mmdc_demo.yaml shrunk (400 images, 16-pixel crops, a tiny network) to a
    fraction of a second an epoch on 2 cores."""
    configure_logging()

    def make(*overrides: str):
        return load_config(CONFIGS / "mmdc_demo.yaml", [
            f"data.path={digits_subset}", f"runs_root={tmp_path / 'runs'}", *TINY_MMDC,
            "optim.batch_size=128", "epochs=1", "mmdc.refine_epochs=1", "mmdc.rotation=true",
            "tracking.enabled=false", "tracking.plots=false", *overrides])

    return make


def test_paper_preset_has_the_papers_hyperparameters(digits_subset):
    cfg = load_config(CONFIGS / "mmdc_resnet18.yaml", [f"data.path={digits_subset}"])
    assert cfg.method == "mmdc" and cfg.model.arch == "resnet18" and cfg.model.fc_dim == 0
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.05, 0.9, 5e-4)
    assert cfg.optim.global_batch == 128 and cfg.epochs == 400
    assert (cfg.mmdc.means, cfg.mmdc.sigma, cfg.mmdc.rotation) == ("onehot", 0.0, True)
    assert [lr_at(cfg.mmdc, 0.05, e) for e in (0, 349, 350, 399)] == pytest.approx(
        [0.05, 0.05, 0.01, 0.01])


def test_trains_checkpoints_and_resumes_exactly_into_refinement(tiny_mmdc, monkeypatch):
    straight = train(tiny_mmdc("name=straight"))
    assert [h["epoch"] for h in straight.history] == [1.0, 2.0]
    main, refine = straight.history
    assert main["moved_fraction"] > 0 and refine["moved_fraction"] == 0  # Hungarian off
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["loss_rotation"])
               for h in straight.history)
    payload = load_checkpoint(straight.checkpoint)
    targets, clusters = payload["targets"], payload["clusters"]
    assert np.array_equal(np.sort(targets["assignment"]), np.arange(400))  # a permutation
    assert targets["refined"].min() >= 0 and clusters["labels"].max() < 10
    labels = np.load(straight.run_dir / "assignments" / "epoch_000002.npy")
    assert np.array_equal(labels, clusters["labels"])

    # the same run, killed when its refinement stage begins, then started again
    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(MMDC, "refine", killed)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_mmdc("name=resumed"))
    resumed = train(tiny_mmdc("name=resumed"))
    after = load_checkpoint(resumed.checkpoint)
    assert_same_weights(payload["model"], after["model"], "the run that was not killed")
    for part, key in (("targets", "assignment"), ("targets", "refined"), ("clusters", "labels")):
        assert np.array_equal(payload[part][key], after[part][key]), key
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
