"""dcluster: distributed DeepCluster training. For Python users: :func:`load_backbone`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def load_backbone(path: str | Path) -> "nn.Module":
    """The torchvision network of a file written by `dcluster export`, returning the trained
    features (see dcluster/export.py); imported on use, so that ``import dcluster`` stays
    free of torch."""
    from dcluster.export import load_backbone as load

    return load(path)
