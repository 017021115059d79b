"""Shared fixtures: the demo digits written once per session, a small demo config, and (the
plugin reference_runs.py) the uninterrupted reference runs."""
from pathlib import Path
from typing import Callable

import pytest

from dcluster.methods import Config
from dcluster.data.demo import make_demo_dataset
from helpers import small_demo

# the real local Slurm cluster fixture (tests/slurm_cluster.py), the shared reference runs
pytest_plugins = ["slurm_cluster", "reference_runs"]


@pytest.fixture(scope="session")
def demo_digits(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture
def small_demo_config(demo_digits, tmp_path) -> Callable[..., Config]:
    """small_demo in this test's own runs_root."""
    return lambda *overrides: small_demo(demo_digits, tmp_path / "runs", *overrides)


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
