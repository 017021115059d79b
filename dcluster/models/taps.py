"""Where the linear probe reads a frozen network: the layers named conv1..convN.

DeepCluster's Table 1 (after Zhang et al.) reads AlexNet after each of its five convs. Deeper
networks are read at the same five depths, one per resolution stage: VGG16 after the last conv
of each of its five blocks, ResNet-18 after its stem and each of its four residual stages
(conv2_x..conv5_x in the ResNet paper's naming); the small demo convnet after each of its
three blocks. Activations are taken after the ReLU, as in the reference implementation.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dcluster.models.convnet import DeepClusterNet


def _every_relu(modules: list[nn.Module]) -> list[int]:
    return [i for i, m in enumerate(modules) if isinstance(m, nn.ReLU)]


def _relu_before_pool(modules: list[nn.Module]) -> list[int]:
    return [i for i in _every_relu(modules)
            if i + 1 < len(modules) and isinstance(modules[i + 1], nn.MaxPool2d)]


def _stem_and_stages(modules: list[nn.Module]) -> list[int]:
    return _every_relu(modules)[:1] + [i for i, m in enumerate(modules)
                                       if isinstance(m, nn.Sequential)]


_RULES: dict[str, Callable[[list[nn.Module]], list[int]]] = {
    "alexnet": _every_relu,
    "smallconv": _every_relu,
    "smallvgg": _every_relu,
    "vgg16": _relu_before_pool,
    "resnet18": _stem_and_stages,
    "resnet50": _stem_and_stages,
}


def tap_positions(arch: str, body: nn.Sequential) -> dict[str, int]:
    """{"conv1": position in ``body`` after which that layer's activations are read, ...}."""
    if arch not in _RULES:
        raise ValueError(f"no layer taps are defined for architecture {arch!r}")
    return {f"conv{n}": i for n, i in enumerate(_RULES[arch](list(body)), 1)}


class LayerTap(nn.Module):
    """The network's front end and body up to ``layer`` ("auto": its deepest conv layer, conv5
    where it has five); shares the network's modules. ``layer`` is the name resolved."""

    def __init__(self, model: DeepClusterNet, arch: str, layer: str) -> None:
        super().__init__()
        taps = tap_positions(arch, model.body)
        if layer == "auto":
            layer = list(taps)[-1]
        if layer not in taps:
            raise ValueError(f"layer {layer!r} does not exist in {arch}; "
                             f"available: {', '.join(taps)} (or auto: {list(taps)[-1]})")
        self.layer = layer
        self.sobel = model.sobel
        self.body = model.body[: taps[layer] + 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sobel is not None:
            x = self.sobel(x)
        return self.body(x)
