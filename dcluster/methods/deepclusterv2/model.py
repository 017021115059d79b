"""DeepCluster-v2's network (swav's src/resnet50.py with ``normalize=True``,
``hidden_mlp``, ``output_dim`` and a list of ``nmb_prototypes``): a DeepCluster backbone's
pooled features, a projection head, L2 normalisation, and one linear prototype layer per
clustering head.

The prototypes are not learnt: each epoch's spherical k-means sets them to its centroids
(:meth:`DeepClusterV2Net.set_prototypes`), so they stay frozen and their scores are the
cosines between an embedding and the centroids. The backbone is a
:class:`~dcluster.models.DeepClusterNet` (``build_model``), as MMDC's is, so that one
definition serves every method and `dcluster eval` reads the same layers.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcluster.core.config import ModelConfig
from dcluster.methods.deepclusterv2.config import DeepClusterV2Config
from dcluster.models import DeepClusterNet, build_model


def projection_head(in_features: int, hidden_mlp: int, feat_dim: int) -> nn.Module:
    """SwAV's projection: Linear-BN-ReLU-Linear, or one Linear with ``hidden_mlp`` 0."""
    if hidden_mlp == 0:
        return nn.Linear(in_features, feat_dim)
    return nn.Sequential(nn.Linear(in_features, hidden_mlp), nn.BatchNorm1d(hidden_mlp),
                         nn.ReLU(inplace=True), nn.Linear(hidden_mlp, feat_dim))


def size_runs(views: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive views of one spatial size: the views one
    backbone pass takes together (swav's ``unique_consecutive`` over the crop sizes)."""
    runs: list[tuple[int, int]] = []
    for i, view in enumerate(views):
        if runs and views[runs[-1][0]].shape[-2:] == view.shape[-2:]:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class DeepClusterV2Net(nn.Module):
    """Backbone -> projection -> unit embedding -> one frozen prototype layer per head."""

    def __init__(self, backbone: DeepClusterNet, feat_dim: int, hidden_mlp: int,
                 prototypes: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = projection_head(backbone.feature_dim, hidden_mlp, feat_dim)
        self.prototypes = nn.ModuleList(nn.Linear(feat_dim, k, bias=False) for k in prototypes)
        for head in self.prototypes:
            # zero until the first clustering sets them: every score 0, no false structure
            nn.init.zeros_(head.weight)
            head.weight.requires_grad = False

    def forward(self, views: Sequence[torch.Tensor]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embeddings (sum of the views' batches, feat_dim) in view order, and each head's
        prototype scores for them. Consecutive views of one size go through the backbone
        as one batch (SwAV's multi-resolution forward: 2 large crops in one pass, the small
        ones in another); the projection sees all of them at once, its BatchNorm's
        statistics over every view, as swav's."""
        pooled = torch.cat([self.backbone.representation(torch.cat(list(views[a:b])))
                            for a, b in size_runs(views)])
        embeddings = F.normalize(self.projection(pooled), dim=1)
        return embeddings, [head(embeddings) for head in self.prototypes]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit embeddings of one view's images: :meth:`forward`'s for a single view, without
        the prototype scores (the memory bank's first filling, evaluation)."""
        return F.normalize(self.projection(self.backbone.representation(images)), dim=1)

    @torch.no_grad()
    def set_prototypes(self, head: int, centroids: Union[np.ndarray, torch.Tensor]) -> None:
        """Head ``head``'s prototypes := ``centroids`` (k, feat_dim), each row normalised."""
        weight = self.prototypes[head].weight
        values = torch.as_tensor(centroids, dtype=weight.dtype, device=weight.device)
        if values.shape != weight.shape:
            raise ValueError(f"head {head} takes {tuple(weight.shape)} centroids, got "
                             f"{tuple(values.shape)}")
        weight.copy_(F.normalize(values, dim=1))


def trunk_width(backbone: DeepClusterNet, size: int) -> int:
    """The width of the backbone's flattened conv output for ``size`` x ``size`` images."""
    was_training = backbone.training
    with torch.no_grad():
        width = backbone.eval().trunk(torch.zeros(1, 3, size, size)).shape[1]
    backbone.train(was_training)
    return width


def build(cfg_model: ModelConfig, cfg_v2: DeepClusterV2Config, crop_size: int,
          view_sizes: Sequence[int] = ()) -> DeepClusterV2Net:
    """The configured network for ``crop_size`` images; every size of ``view_sizes`` (the
    multi-crop views') is checked to give the backbone the same feature width, which only a
    body ending in a global pool does (the ResNets; smallconv, with its adaptive 2x2 pool):
    AlexNet's or VGG's width grows with the image. The backbone and projection
    draw from torch's global generator, so seed it first (seed_everything)."""
    backbone = build_model(cfg_model, crop_size)
    expected = trunk_width(backbone, crop_size)
    for size in sorted(set(view_sizes) - {crop_size}):
        if trunk_width(backbone, size) != expected:
            raise ValueError(f"model.arch = {cfg_model.arch!r} gives {size}-pixel views "
                             f"other features than {crop_size}-pixel ones: multi-size views "
                             "need a globally pooled body (resnet18, resnet50)")
    return DeepClusterV2Net(backbone, cfg_v2.feat_dim, cfg_v2.hidden_mlp, cfg_v2.prototypes)
