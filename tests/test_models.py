"""Model shapes as the paper specifies them, the fixed Sobel front end, and head resets."""
import torch
from torch import nn

from dcluster.core.config import ModelConfig, OptimConfig
from dcluster.models import Sobel, build_model
from dcluster.methods.deepcluster.method import body_optimizer


def conv_channels(model) -> list[int]:
    return [m.out_channels for m in model.body.modules() if isinstance(m, nn.Conv2d)]


def test_alexnet_bn_has_the_papers_filters_and_no_lrn():
    model = build_model(ModelConfig(arch="alexnet"), 224)
    assert conv_channels(model) == [96, 256, 384, 384, 256]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.body.modules()) == 5
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in model.modules())
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(256 * 6 * 6, 4096), (4096, 4096)]
    assert sum(isinstance(m, nn.Dropout) for m in model.classifier) == 2


def test_vgg16_bn_has_13_convs():
    model = build_model(ModelConfig(arch="vgg16", fc_dim=64), 64)
    assert conv_channels(model) == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def test_sobel_is_fixed_and_responds_to_edges_not_colour():
    sobel = Sobel()
    assert all(not p.requires_grad for p in sobel.parameters())
    flat = torch.ones(1, 3, 8, 8) * torch.tensor([0.9, 0.1, 0.4]).view(1, 3, 1, 1)
    # zero up to float32 rounding, which depends on the convolution kernel the CPU picks
    # (2.98e-08 on one machine): the edge responses below are of order 1
    rounding = 1e-6
    assert sobel(flat)[:, :, 1:-1, 1:-1].abs().max() <= rounding  # a uniform colour: no edges
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0  # a vertical edge: x response only
    out = sobel(step)[0, :, 1:-1, 1:-1]
    assert out[0].abs().max() > 0.5 and out[1].abs().max() <= rounding


def test_head_reset_is_deterministic_per_generator_and_excluded_from_body_optimizer():
    model = build_model(ModelConfig(arch="smallconv", width=8, fc_dim=32), 32)
    a = model.reset_head(5, torch.Generator().manual_seed(3)).weight.clone()
    b = model.reset_head(5, torch.Generator().manual_seed(3)).weight.clone()
    c = model.reset_head(5, torch.Generator().manual_seed(4)).weight.clone()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.std().item() - 0.01) < 0.005 and torch.all(model.head.bias == 0)
    opt = body_optimizer(model, OptimConfig(), 0.1)
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert id(model.head.weight) not in in_opt
    assert all(id(p) not in in_opt for p in model.sobel.parameters())
    assert id(model.classifier[1].weight) in in_opt


def test_clustering_features_skip_the_last_relu():
    model = build_model(ModelConfig(arch="smallconv", width=8, fc_dim=32), 32).eval()
    feats = model.clustering_features(torch.randn(4, 3, 32, 32))
    assert feats.shape == (4, 32) and (feats < 0).any()


def test_forward_without_head_is_a_clear_error():
    model = build_model(ModelConfig(arch="smallconv", width=8, fc_dim=32), 32)
    try:
        model(torch.randn(1, 3, 32, 32))
    except RuntimeError as err:
        assert "reset_head" in str(err)
    else:
        raise AssertionError("expected an error")


def test_mmdc_small_vgg_has_four_conv_bn_relu_pool_blocks():
    model = build_model(ModelConfig(arch="smallvgg", width=8, fc_dim=0, sobel=False), 32)
    assert conv_channels(model) == [8, 16, 32, 64]
    kinds = [type(m) for m in model.body]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] * 4
    assert len(model.classifier) == 0 and model.feature_dim == 64 * 2 * 2
    model.reset_head(10, torch.Generator().manual_seed(0))
    assert model.eval()(torch.randn(3, 3, 32, 32)).shape == (3, 10)
