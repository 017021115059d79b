"""The network an evaluation reads: rebuilt from the run's config, with the weights of a
checkpoint, or as initialised (the random-init baseline), frozen."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from dcluster.config import Config
from dcluster.mmdc.model import build_mmdc_model
from dcluster.mmdc.targets import mixture_means
from dcluster.models import DeepClusterNet, build_model
from dcluster.seeding import seed_everything


@dataclass
class Network:
    module: nn.Module  # the whole network: frozen, in eval mode, on the device
    backbone: DeepClusterNet  # front end, body, fc layers: where every protocol reads
    # MMDC only: the embedding and the mixture means that turn it into clusters (eq. 3)
    embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    means: Optional[np.ndarray] = None


def load_network(cfg: Config, payload: Optional[dict[str, Any]], device: torch.device) -> Network:
    """The network of ``cfg.method`` with ``payload["model"]`` loaded; without a payload, as
    initialised from cfg.seed."""
    seed_everything(cfg.seed)
    if cfg.method == "mmdc":
        mmdc = build_mmdc_model(cfg)
        net = Network(mmdc, mmdc.backbone, embed=mmdc.embed, means=mixture_means(cfg.mmdc, cfg.seed))
    else:
        model = build_model(cfg.model, cfg.data.crop_size)
        if payload is not None and payload.get("n_clusters"):
            model.reset_head(payload["n_clusters"], torch.Generator())  # to load its weights
        net = Network(model, model)
    if payload is not None:
        net.module.load_state_dict(payload["model"])
    net.module.to(device).eval()
    for p in net.module.parameters():
        p.requires_grad_(False)
    return net
