"""Runs outlive releases: a checkpoint written by an older dcluster (0dd45d7, committed under
tests/fixtures/ by make_legacy_checkpoint.py) resumes under today's code to the weights of an
uninterrupted run; keys added since are read at their legacy values, and only a real change
of a hashed setting is refused, naming it. Keep this test, and this fixture, in every release.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dcluster.runtime.checkpoint import CheckpointError, checkpoint_name, load_checkpoint
from dcluster.methods import Config, load_config
from dcluster.core.config_settings import hashed_settings
from dcluster.core.rundir import RunDirError, prepare_run_dir
from dcluster.runtime.run_state import check_compatible, upgraded
from dcluster.train import train
from helpers import assert_same_weights

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy_0dd45d7"
OLD_CHECKPOINT = FIXTURE / "run" / "checkpoints" / checkpoint_name(1, 0)


def fixture_config(runs: Path, name: str, *overrides: str) -> Config:
    """The old run's own config.yaml, placed in ``runs`` under ``name``."""
    return load_config(FIXTURE / "run" / "config.yaml",
                       [f"name={name}", f"runs_root={runs}", f"data.path={FIXTURE / 'images'}",
                        *overrides])


def old_run_dir(runs: Path) -> Path:
    """A copy of the old run directory (config.yaml and the checkpoint after epoch 1 of 2)."""
    return Path(shutil.copytree(FIXTURE / "run", runs / "legacy"))


def test_a_checkpoint_of_an_older_dcluster_resumes_to_the_uninterrupted_weights(tmp_path):
    runs = tmp_path / "runs"
    old_run_dir(runs)
    # checkpoint.keep_last only changes what is kept: the resume accepts it
    resumed = train(fixture_config(runs, "legacy", "checkpoint.keep_last=5"))
    uninterrupted = train(fixture_config(runs, "scratch"))
    assert resumed.checkpoint is not None and uninterrupted.checkpoint is not None
    assert resumed.checkpoint.name == uninterrupted.checkpoint.name == checkpoint_name(2, 0)
    # epoch 1 came from the old checkpoint, untouched: it records only a hash of its settings
    assert "settings" not in load_checkpoint(resumed.run_dir / "checkpoints" / OLD_CHECKPOINT.name)
    final = load_checkpoint(resumed.checkpoint)
    expected = load_checkpoint(uninterrupted.checkpoint)["model"]
    if computes_epoch_1_as_the_fixture(uninterrupted.run_dir):
        assert_same_weights(expected, final["model"], "the uninterrupted run of today's code")
    else:
        for name, tensor in expected.items():
            torch.testing.assert_close(final["model"][name], tensor, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
    assert final["settings"] == hashed_settings(fixture_config(runs, "legacy"))


def computes_epoch_1_as_the_fixture(run_dir: Path) -> bool:
    """Whether this machine's epoch 1 of today's code is the fixture's, bit for bit. Not on
    every CPU: torch links MKL, whose sgemm takes kernels of its own on AMD Zen CPUs (chosen
    by the CPUID vendor, no environment variable selects them elsewhere), and the fixture was
    written on one; an Intel CPU differs from it in the last bits from the PCA projection on
    (up to 1e-6 absolute, 1e-7 relative, in the final weights of this 2-epoch run, measured
    2026-12-06). There the resume is checked within float tolerance, which a resume that lost
    state (optimiser, RNG streams, labels) would be far outside."""
    today = load_checkpoint(run_dir / "checkpoints" / OLD_CHECKPOINT.name)["model"]
    old = load_checkpoint(OLD_CHECKPOINT)["model"]
    return all(torch.equal(today[k], old[k]) for k in old)


def test_the_old_checkpoint_is_compatible_with_its_own_settings_and_execution_changes(tmp_path):
    payload = upgraded(load_checkpoint(OLD_CHECKPOINT))
    same = fixture_config(tmp_path, "legacy")
    executed_otherwise = fixture_config(tmp_path, "legacy", "epochs=9", "data.workers=2",
                                        "checkpoint.every_iterations=3", "threads=2")
    for cfg in (same, executed_otherwise):
        check_compatible(payload, hashed_settings(cfg), payload["data_fingerprint"],
                         str(OLD_CHECKPOINT), Config)


def test_a_changed_hashed_setting_is_refused_naming_the_key(tmp_path):
    payload = upgraded(load_checkpoint(OLD_CHECKPOINT))
    changed = fixture_config(tmp_path, "legacy", "clustering.k=5")
    # the checkpoint holds only a hash: its run's config.yaml names what changed
    with pytest.raises(CheckpointError, match=r"clustering\.k: 4 -> 5 .*pass clustering\.k=4"):
        check_compatible(payload, hashed_settings(changed), payload["data_fingerprint"],
                         str(OLD_CHECKPOINT), Config)
    # without it, the refusal says so
    with pytest.raises(CheckpointError, match="hash 5594bc9f48f0fe52; neither this config"):
        check_compatible(payload, hashed_settings(changed), payload["data_fingerprint"],
                         str(tmp_path / "elsewhere" / OLD_CHECKPOINT.name), Config)


def test_the_old_run_directory_refuses_a_changed_hashed_setting_naming_the_key(tmp_path):
    runs = tmp_path / "runs"
    old_run_dir(runs)
    with pytest.raises(RunDirError, match=r"optim\.lr: 0\.01 -> 0\.02"):
        prepare_run_dir(fixture_config(runs, "legacy", "optim.lr=0.02"))


def test_an_old_config_yaml_lacking_keys_reads_them_at_their_legacy_values(tmp_path):
    """A config.yaml of a release before the feature bank (0989d17, the one issue 20 could not
    resume) lacks clustering.features and clustering.bank: the bank's legacy momentum (0, it
    replaced rows) differs from today's default, but the bank is not in effect, so the run
    resumes; one without clustering.pca_sample read all rows (legacy 0), which today's default
    would change, so that is refused with the override that keeps it."""
    runs = tmp_path / "runs"
    stored = old_run_dir(runs) / "config.yaml"
    text = stored.read_text()
    bank = text[text.index("  features:"):text.index("  k: ")]
    assert "momentum: 0.9" in bank
    stored.write_text(text.replace(bank, ""))
    prepare_run_dir(fixture_config(runs, "legacy"))  # accepted

    stored.write_text(text.replace("  pca_sample: 25000\n", ""))
    with pytest.raises(RunDirError, match=r"clustering\.pca_sample: 0 -> 25000 .*"
                                          r"pass clustering\.pca_sample=0"):
        prepare_run_dir(fixture_config(runs, "legacy"))
    prepare_run_dir(fixture_config(runs, "legacy", "clustering.pca_sample=0"))


def test_the_fixture_is_the_tiny_run_it_claims(tmp_path):
    """Cheap guards on what the resume test relies on: 40 committed images, a checkpoint of
    epoch 1 that records only a config hash (the format before this release)."""
    assert len(list((FIXTURE / "images").rglob("*.jpg"))) == 40
    payload = load_checkpoint(OLD_CHECKPOINT)
    assert payload["epoch"] == 1 and "settings" not in payload
    assert isinstance(payload["model"], dict) and all(
        isinstance(t, torch.Tensor) for t in payload["model"].values())
