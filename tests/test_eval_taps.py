"""The layers the linear probe reads (conv1..convN) and the ResNet-18 backbone of MMDC."""
import pytest
import torch
from torch import nn

from dcluster.core.config import ModelConfig
from dcluster.models import LayerTap, build_model, tap_positions


@pytest.mark.parametrize("arch, crop, shapes", [
    ("alexnet", 224, [(96, 55), (256, 27), (384, 13), (384, 13), (256, 13)]),
    ("vgg16", 64, [(64, 64), (128, 32), (256, 16), (512, 8), (512, 4)]),  # end of each block
    ("smallconv", 32, [(8, 32), (16, 16), (32, 8)]),
    ("resnet18", 64, [(64, 32), (64, 16), (128, 8), (256, 4), (512, 2)]),  # stem, 4 stages
])
def test_taps_read_each_stage_after_its_relu(arch, crop, shapes):
    model = build_model(ModelConfig(arch=arch, width=8, fc_dim=0 if arch == "resnet18" else 32),
                        crop).eval()
    names = list(tap_positions(arch, model.body))
    assert names == [f"conv{i}" for i in range(1, len(shapes) + 1)]
    for name, (channels, side) in zip(names, shapes):
        out = LayerTap(model, arch, name)(torch.randn(2, 3, crop, crop))
        assert out.shape == (2, channels, side, side) and out.min() >= 0  # after the ReLU


def test_unknown_layer_names_the_available_ones():
    model = build_model(ModelConfig(arch="smallconv", width=8, fc_dim=32), 32)
    with pytest.raises(ValueError, match="conv1, conv2, conv3"):
        LayerTap(model, "smallconv", "conv5")


def test_resnet18_without_fc_layers_puts_the_head_on_its_pooled_output():
    model = build_model(ModelConfig(arch="resnet18", sobel=True, fc_dim=0), 32)
    assert model.feature_dim == 512 and len(model.classifier) == 0
    assert model.body[0].in_channels == 2  # behind the Sobel front end
    model.reset_head(10, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert model.eval().clustering_features(x).shape == (2, 512)
    assert not any(isinstance(m, nn.Linear) for m in model.body.modules())  # no fc of its own
