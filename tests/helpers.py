"""Helpers many test modules share: the shrunk demo settings and the weights comparison."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from dcluster.methods import Config, load_config
from dcluster.core.logs import configure_logging

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# configs/demo.yaml shrunk so that an epoch takes about a second on 2 cores
SMALL_DEMO = ("model.width=8", "model.fc_dim=64", "clustering.k=10", "clustering.pca_dim=16",
              "progress=never")



def small_demo(digits: Path, runs: Path, *overrides: str) -> Config:
    """SMALL_DEMO, 2 epochs, on ``digits`` in ``runs``; logging to stderr as the CLI does."""
    configure_logging()
    return load_config(CONFIGS / "demo.yaml", [f"data.path={digits}", f"runs_root={runs}",
                                               *SMALL_DEMO, "epochs=2", *overrides])


# configs/mmdc_demo.yaml shrunk (16-pixel crops, a tiny network) to a fraction of a second an
# epoch on 400 images
TINY_MMDC = ("model.width=4", "model.fc_dim=16", "data.crop_size=16", "data.resize_size=16",
             "progress=never")


def assert_same_weights(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
                        what: str = "the reference run") -> None:
    """Bit for bit equal state dicts (BatchNorm buffers included)."""
    assert expected.keys() == got.keys()
    differing = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differing, f"tensors differ from {what}: {differing}"
