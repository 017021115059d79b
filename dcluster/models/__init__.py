"""Model construction from the config: `build_model(cfg.model, crop_size)`."""
from __future__ import annotations

from dcluster.core.config import ModelConfig
from dcluster.models.architectures import alexnet_body, smallconv_body, smallvgg_body, vgg16_body
from dcluster.models.convnet import DeepClusterNet
from dcluster.models.resnet import RESNETS, resnet_body
from dcluster.models.sobel import Sobel
from dcluster.models.taps import LayerTap, tap_positions

__all__ = ["DeepClusterNet", "LayerTap", "build_model", "Sobel", "tap_positions"]


def build_model(cfg: ModelConfig, crop_size: int) -> DeepClusterNet:
    in_channels = Sobel.out_channels if cfg.sobel else 3
    if cfg.arch == "alexnet":
        body, channels = alexnet_body(in_channels)
    elif cfg.arch == "vgg16":
        body, channels = vgg16_body(in_channels)
    elif cfg.arch == "smallconv":
        body, channels = smallconv_body(in_channels, cfg.width)
    elif cfg.arch == "smallvgg":
        body, channels = smallvgg_body(in_channels, cfg.width)
    elif cfg.arch in RESNETS:
        body, channels = resnet_body(cfg.arch, in_channels)
    else:
        raise ValueError(f"model.arch = {cfg.arch!r}: unknown architecture")
    return DeepClusterNet(body, channels, crop_size, cfg.fc_dim, cfg.dropout, cfg.sobel, cfg.fc_init)
