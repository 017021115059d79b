"""torch.hub entry points, so that torchvision-style code loads an exported dcluster network
from a clone of this repository without installing dcluster:

    net = torch.hub.load("/path/to/dcluster", "backbone", "resnet50.pth", source="local")

Why a hub entry and not only the file: a Sobel network and the paper's AlexNet are no
torchvision module; the entry builds them (dcluster/export.py) from the file's own record.
"""
from __future__ import annotations

dependencies = ["torch", "torchvision"]


def backbone(path: str):
    """The network of a file written by `dcluster export`, returning the trained features;
    its ``mean`` and ``std`` attributes are the normalisation its 0..1 RGB input expects."""
    from dcluster.export import load_backbone

    return load_backbone(path)
