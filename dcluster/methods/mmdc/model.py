"""MMDC's network: a DeepCluster network (front end, conv body, optional fully connected
layers) whose replaceable head is the embedding head, plus a rotation head beside it.

Reusing DeepClusterNet keeps one definition of every backbone, and makes the penultimate
features that `dcluster eval` reads (``backbone.clustering_features``) mean the same layer
for both methods.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcluster.core.config import Config
from dcluster.methods.mmdc.rotation import ROTATIONS
from dcluster.methods.mmdc.targets import embedding_dim
from dcluster.models import DeepClusterNet, build_model
from dcluster.core.seeding import derived_seed


class MMDCNet(nn.Module):
    def __init__(self, backbone: DeepClusterNet, dim: int, rotation: bool,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.backbone = backbone
        backbone.reset_head(dim, generator)  # the linear embedding head
        self.rotation = nn.Linear(backbone.feature_dim, ROTATIONS) if rotation else None
        if self.rotation is not None:
            with torch.no_grad():
                self.rotation.weight.normal_(0.0, 0.01, generator=generator)
                self.rotation.bias.zero_()

    def forward(self, x: torch.Tensor, task: str = "embed") -> torch.Tensor:
        """Through forward, so that a DDP replica synchronises the gradients of either task."""
        if task == "embed":
            return self.embed(x)
        if task == "rotation":
            return self.rotation_logits(x)
        raise ValueError(f"unknown MMDC task {task!r}: expected embed or rotation")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings: points on the unit sphere of R^d."""
        return F.normalize(self.backbone(x), dim=1)

    def rotation_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is None:
            raise RuntimeError("this network has no rotation head (mmdc.rotation=false)")
        return self.rotation(self.backbone.representation(x))


def build_mmdc_model(cfg: Config) -> MMDCNet:
    """The heads are drawn from (cfg.seed, "head"); the backbone draws from torch's global
    generator, so seed it first (seed_everything) for a reproducible network."""
    backbone = build_model(cfg.model, cfg.data.crop_size)
    generator = torch.Generator().manual_seed(derived_seed(cfg.seed, 0, "head"))
    return MMDCNet(backbone, embedding_dim(cfg.mmdc), cfg.mmdc.rotation, generator)
