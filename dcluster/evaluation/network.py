"""The network an evaluation reads: rebuilt from the run's config by its method (its
NetworkRecipe, which the application layer hands down: dcluster/methods/spec.py), with the
weights of a checkpoint, or as initialised (the random-init baseline), frozen."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol

import numpy as np
import torch
from torch import nn

from dcluster.runtime.checkpoint import CheckpointError
from dcluster.core.config import Config
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


class NetworkRecipe(Protocol):
    """How a method's trained network is rebuilt (a MethodSpec, dcluster/methods/spec.py)."""
    network_keys: tuple[str, ...]  # the keys besides model.* its weights' shapes depend on

    @property
    def eval_network(self) -> Callable[[Config, Optional[dict[str, Any]]], Network]: ...


def describe_network(cfg: Config) -> str:
    """One phrase naming a config's network, for error messages."""
    return (f"{cfg.method} {cfg.model.arch} (width {cfg.model.width}, fc_dim "
            f"{cfg.model.fc_dim}, crop {cfg.data.crop_size})")


def load_network(cfg: Config, payload: Optional[dict[str, Any]], device: torch.device,
                 recipes: Mapping[str, NetworkRecipe]) -> Network:
    """The network of ``cfg.method`` (rebuilt by its recipe among ``recipes``) with
    ``payload["model"]`` loaded; without a payload, as initialised from cfg.seed. The
    config's ``method`` names one of them: its choices are the method folders
    (tests/test_layers.py)."""
    seed_everything(cfg.seed)
    net = recipes[cfg.method].eval_network(cfg, payload)
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
