"""The auxiliary task of MMDC (paper section III.D, after RotNet): every image of a batch in
its four rotations, labelled by the rotation, for a 4-way classifier."""
from __future__ import annotations

import torch

ROTATIONS = 4  # 0, 90, 180, 270 degrees


def rotated_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4B, C, H, W) images and (4B,) labels: label r marks a counter-clockwise rotation by
    r * 90 degrees, rotations grouped (all of r = 0, then all of r = 1, ...)."""
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"rotations need square (B, C, S, S) crops, got {tuple(images.shape)}")
    rotated = torch.cat([torch.rot90(images, r, dims=(2, 3)) for r in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels
