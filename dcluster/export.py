"""`dcluster export`: a trained backbone's weights under torchvision's names, so that the
library a user fine-tunes with can load them (VISSL and mmselfsup ship such converters).

The file is a plain state dict of ``torchvision.models.<name>()`` without its last layer (the
1000-way classifier, which unsupervised training has no counterpart for): vgg16_bn, resnet18
or resnet50. dcluster's AlexNet is the paper's (96-256-384-384-256 filters, BatchNorm, no
LRN), which torchvision's AlexNet (64-192-384-256-256, no BatchNorm) cannot hold, so it has
no export. The clustering head is not exported: its cluster ids mean nothing downstream.

The Sobel front end (fixed grayscale + Sobel filters, models/sobel.py) is not part of any
torchvision network. A Sobel network's exported first conv takes its 2 channels instead of
RGB's 3, and :func:`load_backbone` puts the front end back in front of it (as module
``sobel``); with ``torchvision.models.X()`` directly, replace its first conv with a 2-channel
one before loading and feed it ``dcluster.models.Sobel()(images)``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dcluster.core.atomic import atomic_write
from dcluster.core.errors import UserError
from dcluster.models import DeepClusterNet, Sobel

log = logging.getLogger("dcluster.export")

# torchvision's VGG reads its classifier after a 7x7 adaptive pool: dcluster's VGG16 matches
# it only where its body ends at 7x7 (224-pixel crops)
_VGG_FLAT = 512 * 7 * 7
_VGG_FC = 4096
# dcluster's ResNet body positions of torchvision's modules (models/resnet.py)
_RESNET_STAGES = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}
# dcluster's fully connected layers (models/convnet.py) and VGG's places for them
_VGG_CLASSIFIER = {1: 0, 4: 3}


class ExportError(ValueError, UserError):
    """A network that has no torchvision counterpart, or an exported file that is not one."""


def _parts(key: str) -> tuple[str, str, str]:
    """"body.7.1.bn2.weight" -> ("body", "7", "1.bn2.weight")."""
    part, _, rest = key.partition(".")
    index, _, rest = rest.partition(".")
    return part, index, rest


def _vgg16_bn_keys(net: DeepClusterNet) -> Callable[[str], str | None]:
    fc = [m for m in net.classifier if isinstance(m, nn.Linear)]
    if not fc or fc[0].in_features != _VGG_FLAT or fc[0].out_features != _VGG_FC:
        raise ExportError("torchvision's vgg16_bn reads its classifier from a 7x7 map: export "
                          "a VGG16 trained with data.crop_size=224 and model.fc_dim=4096")

    def rename(key: str) -> str | None:
        part, index, rest = _parts(key)
        if part == "body":
            return f"features.{index}.{rest}"
        if part == "classifier":
            return f"classifier.{_VGG_CLASSIFIER[int(index)]}.{rest}"
        return None
    return rename


def _resnet_keys(net: DeepClusterNet) -> Callable[[str], str | None]:
    if len(net.classifier):
        raise ExportError("a ResNet with fully connected layers (model.fc_dim > 0) has no "
                          "torchvision counterpart: export one trained with model.fc_dim=0")

    def rename(key: str) -> str | None:
        part, index, rest = _parts(key)
        return f"{_RESNET_STAGES[int(index)]}.{rest}" if part == "body" else None
    return rename


_RENAMES: dict[str, tuple[str, Callable[[DeepClusterNet], Callable[[str], str | None]]]] = {
    "vgg16": ("vgg16_bn", _vgg16_bn_keys),
    "resnet18": ("resnet18", _resnet_keys),
    "resnet50": ("resnet50", _resnet_keys),
}


def torchvision_state_dict(net: DeepClusterNet, arch: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(torchvision model name, its state dict without the last layer) of a dcluster
    network of model.arch ``arch``; the Sobel filters and the head are left out."""
    if arch not in _RENAMES:
        raise ExportError(f"model.arch {arch!r} has no torchvision counterpart; export "
                          f"supports {', '.join(_RENAMES)}"
                          + (" (dcluster's AlexNet is the paper's, with BatchNorm and other "
                             "widths than torchvision's)" if arch == "alexnet" else ""))
    name, renamer = _RENAMES[arch]
    rename = renamer(net)
    out = {}
    for key, value in net.state_dict().items():
        new = rename(key)
        if new is not None:
            out[new] = value.detach().clone()
    return name, out


def export_backbone(target: str | Path, out: str | Path) -> tuple[str, Path]:
    """Write the backbone of a run directory's newest checkpoint, or of one checkpoint file,
    to ``out`` (atomically); return (torchvision model name, out)."""
    from dcluster.evaluation.network import load_network
    from dcluster.evaluation.target import resolve_target

    resolved = resolve_target(target)
    if resolved.payload is None:
        raise ExportError(f"{target}: a config holds no trained weights; export a run "
                          "directory or a checkpoint")
    net = load_network(resolved.cfg, resolved.payload, torch.device("cpu"))
    name, state = torchvision_state_dict(net.backbone, resolved.cfg.model.arch)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: torch.save(state, f))
    log.info("exported %s (epoch %d) as torchvision %s%s to %s", resolved.describe(),
             resolved.epoch, name, " behind the Sobel front end" if net.backbone.sobel else "",
             out)
    return name, out


def _arch_of(state: dict[str, torch.Tensor], path: Path) -> str:
    if "features.0.weight" in state:
        return "vgg16_bn"
    if "layer4.0.conv3.weight" in state:
        return "resnet50"
    if "layer4.0.conv2.weight" in state:
        return "resnet18"
    raise ExportError(f"{path}: not a file written by `dcluster export` (no vgg16_bn or "
                      "resnet key layout)")


class SobelBackbone(nn.Module):
    """A torchvision network behind dcluster's fixed Sobel front end."""

    def __init__(self, sobel: Sobel, net: nn.Module) -> None:
        super().__init__()
        self.sobel = sobel
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.sobel(x))


def load_backbone(path: str | Path) -> nn.Module:
    """The torchvision network of an exported file, with its weights and with its last layer
    replaced by the identity, so that it returns the features dcluster trained (the
    classifier's ReLU output for VGG16, the pooled 512/2048 values for ResNets); behind the
    Sobel front end (a :class:`SobelBackbone`) if it was trained with one. In train mode, as
    torchvision builds it: call ``.eval()`` for frozen features."""
    import torchvision.models

    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ExportError(f"{path}: holds a {type(state).__name__}, not a state dict")
    name = _arch_of(state, path)
    net = getattr(torchvision.models, name)(weights=None)
    first = "features.0" if name == "vgg16_bn" else "conv1"
    in_channels = state[f"{first}.weight"].shape[1]
    if in_channels == Sobel.out_channels:
        old: nn.Conv2d = net.get_submodule(first)
        net.set_submodule(first, nn.Conv2d(in_channels, old.out_channels, old.kernel_size,
                                           old.stride, old.padding, bias=old.bias is not None))
    missing, unexpected = net.load_state_dict(state, strict=False)
    last = "classifier.6" if name == "vgg16_bn" else "fc"
    if unexpected or any(not key.startswith(last + ".") for key in missing):
        raise ExportError(f"{path}: does not fit torchvision's {name}: missing "
                          f"{[k for k in missing if not k.startswith(last)]}, unexpected "
                          f"{unexpected}")
    net.set_submodule(last, nn.Identity())
    return SobelBackbone(Sobel(), net) if in_channels == Sobel.out_channels else net
