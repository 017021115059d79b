"""`dcluster export`: every trained backbone as a file that plain PyTorch / torchvision code
can load without dcluster's training code, with what it expects written into it.

The file is a dict (``torch.load(path, weights_only=True)``):

- ``state_dict``: the backbone's weights. Under torchvision's names where torchvision has the
  network (vgg16 as ``vgg16_bn``, resnet18, resnet50: ``torchvision.models.<torchvision>()``
  loads it with ``strict=False``, only its last layer, the 1000-way classifier, missing);
  under dcluster's names (``dcluster.models.build_model``) for the paper's AlexNet (96-256-384-
  384-256 filters with BatchNorm, which torchvision's AlexNet cannot hold), smallconv,
  smallvgg, and a VGG16 or ResNet that torchvision's cannot hold (other crops or fc widths). The clustering head is left out: its cluster ids mean nothing downstream.
- ``front_end``: the fixed Sobel front end's two convs (grayscale 3->1 1x1, Sobel 1->2 3x3 with
  padding 1, no biases) as the state dict of that ``nn.Sequential``, or None without one. A
  Sobel network's first conv takes those 2 channels instead of RGB's 3.
- ``mean``, ``std``, ``crop_size``: the normalisation of 0..1 RGB images the network was
  trained with, and the side of its crops.
- ``arch``, ``torchvision`` (the torchvision name, or ""), ``model`` (the model.* keys),
  ``feature_dim``.

:func:`load_backbone` (``dcluster.load_backbone``, and ``hubconf.py``'s ``backbone`` entry for
``torch.hub.load``) builds the module from it, returning the features dcluster trained.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dcluster.core.atomic import atomic_write
from dcluster.core.errors import UserError
from dcluster.core.config import ModelConfig
from dcluster.data.crops import normalization
from dcluster.models import DeepClusterNet, Sobel, build_model

log = logging.getLogger("dcluster.export")

# torchvision's VGG reads its classifier after a 7x7 adaptive pool: dcluster's VGG16 matches
# it only where its body ends at 7x7 (224-pixel crops)
_VGG_FLAT = 512 * 7 * 7
_VGG_FC = 4096
# dcluster's ResNet body positions of torchvision's modules (models/resnet.py)
_RESNET_STAGES = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}
# dcluster's fully connected layers (models/convnet.py) and VGG's places for them
_VGG_CLASSIFIER = {1: 0, 4: 3}


EXPORT_FORMAT = "dcluster-backbone-2"  # the first layout was a bare torchvision state dict


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


def export_payload(net: DeepClusterNet, model: ModelConfig, crop_size: int,
                   grayscale_stats: bool) -> dict[str, Any]:
    """The exported file's content for a dcluster backbone built from ``model``: under
    torchvision's names where torchvision's network can hold it, else under dcluster's (the
    paper's AlexNet, the small networks, a VGG16 of other crops or fc widths than
    torchvision's, a ResNet with fc layers), so that every trained network is exportable."""
    name, state = "", {}
    if model.arch in _RENAMES:
        try:
            name, state = torchvision_state_dict(net, model.arch)
        except ExportError as why:
            log.info("written under dcluster's names: %s", why)
    if not name:
        state = {key: value.detach().clone() for key, value in net.state_dict().items()
                 if not key.startswith(("head.", "sobel."))}
    mean, std = normalization(grayscale_stats)
    front = None
    if net.sobel is not None:
        front = {key.removeprefix("filters."): value.detach().clone()
                 for key, value in net.sobel.state_dict().items()}
    return {"format": EXPORT_FORMAT, "arch": model.arch, "torchvision": name,
            "model": asdict(model), "crop_size": crop_size, "feature_dim": net.feature_dim,
            "mean": list(mean), "std": list(std), "front_end": front, "state_dict": state}


def export_backbone(target: str | Path, out: str | Path) -> tuple[str, Path]:
    """Write the backbone of a run directory's newest checkpoint, or of one checkpoint file,
    to ``out`` (atomically); return (the network's name, out): torchvision's, or dcluster's
    model.arch where torchvision has no such network."""
    from dcluster.evaluation.network import load_network
    from dcluster.evaluation.target import resolve_target
    from dcluster.methods import METHODS, Config

    resolved = resolve_target(target, (), METHODS, Config)
    if resolved.payload is None:
        raise ExportError(f"{target}: a config holds no trained weights; export a run "
                          "directory or a checkpoint")
    cfg = resolved.cfg
    net = load_network(cfg, resolved.payload, torch.device("cpu"), METHODS)
    payload = export_payload(net.backbone, cfg.model, cfg.data.crop_size,
                             cfg.data.grayscale_stats)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: torch.save(payload, f))
    name = payload["torchvision"] or cfg.model.arch
    log.info("exported %s as %s%s to %s", resolved.describe(),
             f"torchvision {name}" if payload["torchvision"] else f"dcluster {name}",
             " behind the Sobel front end" if net.backbone.sobel else "", out)
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


def sobel_front_end() -> nn.Sequential:
    """The module the file's ``front_end`` is the state dict of (plain torch, no dcluster)."""
    return nn.Sequential(nn.Conv2d(3, 1, kernel_size=1, bias=False),
                         nn.Conv2d(1, 2, kernel_size=3, padding=1, bias=False))


class Backbone(nn.Module):
    """An exported network: the front end (the identity without Sobel), then the network;
    ``mean`` and ``std`` are the normalisation its input expects (0..1 RGB images)."""

    def __init__(self, front: nn.Module, net: nn.Module, mean: list[float],
                 std: list[float]) -> None:
        super().__init__()
        self.front = front
        self.net = net
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.front(x))


class _Representation(nn.Module):
    """A dcluster network without torchvision counterpart, returning what its head saw."""

    def __init__(self, net: DeepClusterNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.representation(x)


def _torchvision_net(name: str, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """torchvision's ``name`` with the weights and its last layer replaced by the identity."""
    import torchvision.models

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
    return net


def _dcluster_net(export: dict[str, Any]) -> nn.Module:
    net = build_model(ModelConfig(**export["model"]), export["crop_size"])
    missing, unexpected = net.load_state_dict(export["state_dict"], strict=False)
    assert not unexpected and all(key.startswith("sobel.") for key in missing), (missing,
                                                                                unexpected)
    net.sobel = None  # the Backbone's front end stands in front of it
    return _Representation(net)


def load_backbone(path: str | Path) -> Backbone:
    """The network of an exported file, with its weights, returning the features dcluster
    trained (the fc layers' ReLU output, or the pooled 512/2048 values of a ResNet with
    model.fc_dim 0), behind the Sobel front end if it was trained with one. In train mode, as
    torchvision builds it: call ``.eval()`` for frozen features. Files of the first export
    layout (a bare torchvision state dict) load too, with ImageNet's mean and std."""
    path = Path(path)
    export = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(export, dict):
        raise ExportError(f"{path}: holds a {type(export).__name__}, not a dcluster export")
    if export.get("format") != EXPORT_FORMAT:  # the first layout: torchvision weights only
        name = _arch_of(export, path)
        first = export["features.0.weight" if name == "vgg16_bn" else "conv1.weight"]
        front = None if first.shape[1] == 3 else {
            key.removeprefix("filters."): value for key, value in Sobel().state_dict().items()}
        mean, std = normalization(False)
        export = {"torchvision": name, "state_dict": export, "front_end": front,
                  "mean": list(mean), "std": list(std)}
    if export["torchvision"]:
        net = _torchvision_net(export["torchvision"], export["state_dict"], path)
    else:
        net = _dcluster_net(export)
    front: nn.Module = nn.Identity()
    if export["front_end"] is not None:
        front = sobel_front_end()
        front.load_state_dict(export["front_end"])
        front.requires_grad_(False)
    return Backbone(front, net, export["mean"], export["std"])
