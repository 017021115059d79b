"""The fixed Sobel front end of DeepCluster (paper section 3.4).

Colour lets a convnet separate clusters by trivial colour statistics; a fixed grayscale +
Sobel transform removes colour and raises local contrast, so the clusters must be found in
edges and shapes. Its weights are buffers-in-all-but-name: they never receive gradients.
"""
from __future__ import annotations

import torch
from torch import nn


class Sobel(nn.Module):
    """RGB (3 channels) -> Sobel x/y responses of the grayscale image (2 channels)."""

    out_channels = 2

    def __init__(self) -> None:
        super().__init__()
        grayscale = nn.Conv2d(3, 1, kernel_size=1, bias=False)
        grayscale.weight.data.fill_(1.0 / 3.0)
        sobel = nn.Conv2d(1, 2, kernel_size=3, padding=1, bias=False)
        dx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        sobel.weight.data[0, 0].copy_(dx)
        sobel.weight.data[1, 0].copy_(dx.t())
        self.filters = nn.Sequential(grayscale, sobel)
        for p in self.parameters():
            p.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.filters(x)
