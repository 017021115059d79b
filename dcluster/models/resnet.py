"""ResNet-18 and ResNet-50 from torchvision, untrained, as conv bodies (ResNet-18: MMDC's
backbone, paper section IV.A; ResNet-50: what the maintained SSL frameworks train DeepCluster
with, mmselfsup and SwAV's DeepClusterV2)."""
from __future__ import annotations

from torch import nn

# the channels of each network's pooled output: the feature dimension with fc_dim 0
RESNETS = {"resnet18": 512, "resnet50": 2048}


def resnet_body(arch: str, in_channels: int) -> tuple[nn.Sequential, int]:
    """Every module of torchvision's ``arch`` but its classifier, global average pool
    included, as one Sequential (so that layer taps address its stages by position, and
    positions 0..8 name torchvision's conv1, bn1, relu, maxpool, layer1..4, avgpool); the
    first conv takes ``in_channels`` (2 behind the Sobel front end). torchvision is imported
    here, for these architectures only: it adds about 3 s to the start of every process."""
    import torchvision.models

    net = getattr(torchvision.models, arch)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    stages = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
              net.layer4, net.avgpool]
    return nn.Sequential(*stages), RESNETS[arch]
