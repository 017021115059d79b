"""ResNet-18 from torchvision, untrained, as a conv body (MMDC's backbone, paper section IV.A)."""
from __future__ import annotations

from torch import nn


def resnet18_body(in_channels: int) -> tuple[nn.Sequential, int]:
    """Every module of torchvision's ResNet-18 but its classifier, global average pool
    included, as one Sequential (so that layer taps address its stages by position); the
    first conv takes ``in_channels`` (2 behind the Sobel front end). torchvision is imported
    here, for this architecture only: it adds about 3 s to the start of every process."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    stages = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
              net.layer4, net.avgpool]
    return nn.Sequential(*stages), 512
