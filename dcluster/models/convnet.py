"""The network shape shared by every DeepCluster model: front end, conv body, fc classifier
and a replaceable head.

The head is re-created after every clustering because cluster ids carry no meaning from one
clustering to the next (paper section 3.2); everything else keeps learning across epochs.
Clustering features are the classifier's output *before* its last ReLU, taken in eval mode,
as in the reference implementation: the ReLU would zero half of a whitened feature space.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dcluster.models.sobel import Sobel


def init_paper_weights(module: nn.Module, fc_init: str = "paper") -> None:
    """He-normal convs (fan-out), unit BatchNorm, N(0, 0.01) linears (N(0, 1/fan_in) with
    fc_init="fan_in"), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            std = 0.01 if fc_init == "paper" else m.in_features ** -0.5
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)


def fc_classifier(in_features: int, fc_dim: int, dropout: float) -> nn.Sequential:
    """Two fully connected layers; the last module is the ReLU that feature extraction skips.
    fc_dim 0: none at all (ResNet style: features are the pooled conv output)."""
    if fc_dim == 0:
        return nn.Sequential()
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(in_features, fc_dim), nn.ReLU(inplace=True),
        nn.Dropout(dropout), nn.Linear(fc_dim, fc_dim), nn.ReLU(inplace=True),
    )


class DeepClusterNet(nn.Module):
    def __init__(self, body: nn.Module, body_channels: int, crop_size: int, fc_dim: int,
                 dropout: float, sobel: bool, fc_init: str = "paper") -> None:
        super().__init__()
        self.sobel: Optional[Sobel] = Sobel() if sobel else None
        self.body = body
        with torch.no_grad():
            probe = torch.zeros(1, Sobel.out_channels if sobel else 3, crop_size, crop_size)
            flat = self.body.eval()(probe).flatten(1).shape[1]
        self.body.train()
        if flat <= 0:
            raise ValueError(f"crop size {crop_size} is too small for this architecture")
        self.feature_dim = fc_dim or flat
        self.classifier = fc_classifier(flat, fc_dim, dropout)
        self.head: Optional[nn.Linear] = None
        self.body_channels = body_channels
        init_paper_weights(self, fc_init)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        if self.sobel is not None:
            x = self.sobel(x)
        return self.body(x).flatten(1)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """What the head sees: the classifier's output, its final ReLU included; a second
        head (MMDC's rotation head) is put on the same place."""
        return self.classifier(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("the classifier head is not created yet: call reset_head(k)")
        return self.head(self.representation(x))

    def clustering_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations without the final ReLU (call in eval mode); with no fully
        connected layers (fc_dim 0), the pooled conv output."""
        h = self.trunk(x)
        for layer in list(self.classifier)[:-1]:
            h = layer(h)
        return h

    def clustering_feature_layer(self) -> nn.Module:
        """The module whose output, flattened, is :meth:`clustering_features`: a forward hook
        on it reads the features of a training forward without a second pass (the feature
        bank). Its output is taken before the in-place ReLU that follows overwrites it."""
        return self.classifier[-2] if len(self.classifier) else self.body

    def reset_head(self, k: int, generator: torch.Generator) -> nn.Linear:
        """A fresh k-way head with the paper's init, drawn from `generator` so that every
        process that draws from the same seed builds the identical head."""
        head = nn.Linear(self.feature_dim, k)
        with torch.no_grad():
            head.weight.normal_(0.0, 0.01, generator=generator)
            head.bias.zero_()
        device = next(self.body.parameters()).device
        self.head = head.to(device)
        return self.head
