"""DeepCluster-v2's training loss: every view of an image is to be classified into the
cluster its image was assigned by each head's k-means (swav's main_deepclusterv2.py
``train``): the cross-entropy of the prototype scores over a temperature, averaged over the
heads.

The scores are cosines (unit embeddings against unit prototypes), so they lie in [-1, 1];
the temperature (0.1) sharpens them into usable logits. Images without an assignment
(label -100, none in the bank yet) are ignored, as by swav's ``ignore_index=-100``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

UNASSIGNED = -100
"""The label of an image no clustering has assigned (torch's default ``ignore_index``)."""


def prototype_loss(scores: Sequence[torch.Tensor], assignments: Sequence[torch.Tensor],
                   temperature: float, n_views: int) -> torch.Tensor:
    """Mean over heads h of the cross-entropy of ``scores[h] / temperature`` against
    ``assignments[h]`` repeated for every view.

    ``scores[h]``: (n_views * B, k_h) in view order (all B images of view 0, then view 1...),
    as :meth:`DeepClusterV2Net.forward` returns them; ``assignments[h]``: (B,) int64, the
    cluster of each image of the batch for head h (swav: ``assignments[h][idx]``)."""
    if len(scores) != len(assignments) or not scores:
        raise ValueError(f"{len(scores)} heads of scores for {len(assignments)} of assignments")
    losses = []
    for head_scores, labels in zip(scores, assignments):
        if head_scores.shape[0] != n_views * labels.shape[0]:
            raise ValueError(f"scores for {head_scores.shape[0]} views x images, but "
                             f"{n_views} views of {labels.shape[0]} images")
        targets = labels.to(head_scores.device).repeat(n_views)
        losses.append(F.cross_entropy(head_scores / temperature, targets,
                                      ignore_index=UNASSIGNED))
    return torch.stack(losses).mean()
