"""Conv bodies: AlexNet-BN and VGG16-BN as in the paper, a small convnet for the demo, and the
small VGG of the MMDC paper's MNIST experiments."""
from __future__ import annotations

from typing import Sequence, Union

from torch import nn

# (out_channels, kernel, stride, padding) or "M" for a 3x3/2 max-pool: AlexNet without LRN.
ALEXNET_LAYERS: Sequence[Union[tuple[int, int, int, int], str]] = (
    (96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M",
)
VGG16_LAYERS: Sequence[Union[int, str]] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def conv_body(specs: Sequence[Union[tuple[int, int, int, int], str]], in_channels: int,
              pool: int) -> tuple[nn.Sequential, int]:
    """conv-BN-ReLU blocks from (out_channels, kernel, stride, padding) specs, "M" being a
    pool x pool max-pool of stride 2 (overlapping for AlexNet's pool=3)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for spec in specs:
        if spec == "M":
            layers.append(nn.MaxPool2d(kernel_size=pool, stride=2))
        else:
            cout, kernel, stride, padding = spec  # type: ignore[misc]
            layers += conv_bn_relu(channels, cout, kernel, stride, padding)
            channels = cout
    return nn.Sequential(*layers), channels


def alexnet_body(in_channels: int) -> tuple[nn.Sequential, int]:
    return conv_body(ALEXNET_LAYERS, in_channels, pool=3)


def vgg16_body(in_channels: int) -> tuple[nn.Sequential, int]:
    specs = [s if s == "M" else (int(s), 3, 1, 1) for s in VGG16_LAYERS]
    return conv_body(specs, in_channels, pool=2)


def smallconv_body(in_channels: int, width: int) -> tuple[nn.Sequential, int]:
    """Three conv-BN-ReLU stages with pooling, then a 2x2 pool: a few hundred thousand
    parameters, enough to learn digit shapes in minutes on two CPU cores."""
    layers: list[nn.Module] = []
    channels = in_channels
    for cout in (width, 2 * width, 4 * width):
        layers += conv_bn_relu(channels, cout, 3, 1, 1)
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        channels = cout
    layers.append(nn.AdaptiveAvgPool2d(2))
    return nn.Sequential(*layers), channels


def smallvgg_body(in_channels: int, width: int) -> tuple[nn.Sequential, int]:
    """The MMDC paper's MNIST network (section IV.A, "Architectures"): a small VGG of four
    blocks, each one conv-BN-ReLU and a 2x2 max-pool, followed directly by the linear head
    (fc_dim 0). The paper gives no widths; VGG's doubling from ``width`` is used (64: VGG's
    64..512; the preset's 32 keeps an epoch of MNIST-5k near half a minute on one CPU core).
    A 32-pixel input leaves 2x2 x 8*width features."""
    layers: list[nn.Module] = []
    channels = in_channels
    for cout in (width, 2 * width, 4 * width, 8 * width):
        layers += conv_bn_relu(channels, cout, 3, 1, 1)
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        channels = cout
    return nn.Sequential(*layers), channels
