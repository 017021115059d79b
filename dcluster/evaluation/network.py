"""The network an evaluation reads: rebuilt from the run's config by its method (the registry,
dcluster/core/registry.py), with the weights of a checkpoint, or as initialised (the random-init
baseline), frozen."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from dcluster.runtime.checkpoint import CheckpointError
from dcluster.core.config import Config
from dcluster.evaluation.target import describe_network
from dcluster.core.registry import method_module
from dcluster.models import DeepClusterNet
from dcluster.core.seeding import seed_everything


@dataclass
class OwnClusters:
    """How a network clusters images by itself (MMDC: the mixture component nearest its
    embedding, eq. 3), given by its method: what it computes per image, and the cluster of
    each row of that."""
    embed: Callable[[torch.Tensor], torch.Tensor]
    assign: Callable[[np.ndarray], np.ndarray]


@dataclass
class Network:
    module: nn.Module  # the whole network: frozen, in eval mode, on the device
    backbone: DeepClusterNet  # front end, body, fc layers: where every protocol reads
    own_clusters: Optional[OwnClusters] = None  # None: a network that does not cluster


def load_network(cfg: Config, payload: Optional[dict[str, Any]], device: torch.device) -> Network:
    """The network of ``cfg.method`` with ``payload["model"]`` loaded; without a payload, as
    initialised from cfg.seed."""
    seed_everything(cfg.seed)
    net = method_module(cfg.method).eval_network(cfg, payload)
    if payload is not None:
        try:
            net.module.load_state_dict(payload["model"])
        except RuntimeError as err:  # a checkpoint copied between run directories, say
            first = str(err).splitlines()[1:2] or [str(err)]
            raise CheckpointError(
                f"the checkpoint's weights do not fit the {describe_network(cfg)} network its "
                f"run directory's config.yaml describes: {first[0].strip()}") from None
    net.module.to(device).eval()
    for p in net.module.parameters():
        p.requires_grad_(False)
    return net
