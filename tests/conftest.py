"""Shared fixtures: the demo digits written once per session, and a small demo config."""
from pathlib import Path
from typing import Callable

import pytest

from dcluster.config import Config, load_config
from dcluster.data.demo import make_demo_dataset
from dcluster.logs import configure_logging

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
pytest_plugins = ["slurm_cluster"]  # the real local Slurm cluster fixture (tests/slurm_cluster.py)


@pytest.fixture(scope="session")
def demo_digits(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture
def small_demo_config(demo_digits, tmp_path) -> Callable[..., Config]:
    """configs/demo.yaml shrunk so that an epoch takes about a second on 2 cores."""
    configure_logging()

    def make(*overrides: str) -> Config:
        return load_config(CONFIGS / "demo.yaml", [
            f"data.path={demo_digits}", f"runs_root={tmp_path / 'runs'}", "model.width=8",
            "model.fc_dim=64", "clustering.k=10", "clustering.pca_dim=16", "epochs=2",
            "progress=never", *overrides])

    return make


@pytest.fixture(scope="session")
def digits_subset(demo_digits, tmp_path_factory) -> Path:
    """40 demo digits of each class (400 images): for end-to-end runs of several epochs that
    test mechanics (resume, evaluation records), not what the demo learns."""
    root = tmp_path_factory.mktemp("digits_subset")
    for class_dir in sorted(p for p in demo_digits.iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir()
        for image in sorted(class_dir.iterdir())[:40]:
            (root / class_dir.name / image.name).write_bytes(image.read_bytes())
    return root
