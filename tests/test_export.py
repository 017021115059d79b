"""`dcluster export`: every trained backbone (the paper's AlexNet and the Sobel front end
included) loads through the documented code paths (dcluster.load_backbone, torch.hub.load of
hubconf.py, plain torchvision for its own networks) and gives dcluster's features; the
normalisation it expects is in the file."""
from pathlib import Path

import pytest
import torch
import torchvision

from dcluster import load_backbone
from dcluster.cli import main
from dcluster.core.config import ModelConfig
from dcluster.methods import load_config
from dcluster.data.crops import normalization
from dcluster.export import ExportError, export_payload, torchvision_state_dict
from dcluster.core.logs import configure_logging
from dcluster.models import build_model
from dcluster.train import train

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def trained_looking(arch: str, crop: int, sobel: bool, fc_dim: int):
    """A dcluster network with BatchNorm statistics of its own, as training leaves them."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch=arch, sobel=sobel, fc_dim=fc_dim, dropout=0.5), crop)
    with torch.no_grad():
        for name, buffer in net.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    return net.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch, crop, fc_dim", [
    ("alexnet", 64, 64), ("vgg16", 224, 4096), ("resnet50", 64, 0)])
def test_an_exported_sobel_network_loads_the_documented_ways_with_dcluster_features(
        arch, crop, fc_dim, tmp_path):
    net = trained_looking(arch, crop, sobel=True, fc_dim=fc_dim)
    path = tmp_path / f"{arch}.pth"
    torch.save(export_payload(net, ModelConfig(arch=arch, sobel=True, fc_dim=fc_dim), crop,
                              grayscale_stats=False), path)
    images = torch.randn(2, 3, crop, crop)
    with torch.no_grad():
        expected = net.representation(images)
        loaded = load_backbone(path).eval()
        assert close(loaded(images), expected)
        assert (loaded.mean, loaded.std) == tuple(map(list, normalization(False)))
        hub = torch.hub.load(str(REPO), "backbone", str(path), source="local").eval()
        assert close(hub(images), expected)


def test_a_vgg16_torchvision_cannot_hold_is_exported_under_dcluster_names(tmp_path):
    """64-pixel crops and fc 64: torchvision's vgg16_bn reads a 7x7 map into 4096 units."""
    net = trained_looking("vgg16", 64, sobel=True, fc_dim=64)
    payload = export_payload(net, ModelConfig(arch="vgg16", sobel=True, fc_dim=64), 64, False)
    assert payload["torchvision"] == "" and "body.0.weight" in payload["state_dict"]
    torch.save(payload, tmp_path / "vgg16.pth")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert close(load_backbone(tmp_path / "vgg16.pth").eval()(images),
                     net.representation(images))


def test_the_plain_torchvision_snippet_of_the_docs_loads_a_sobel_resnet50(tmp_path):
    """docs/evaluation.md's code for torchvision without dcluster, as written there."""
    dc_net = trained_looking("resnet50", 64, sobel=True, fc_dim=0)
    torch.save(export_payload(dc_net, ModelConfig(arch="resnet50", sobel=True, fc_dim=0), 64,
                              grayscale_stats=False), tmp_path / "resnet50.pth")
    images = torch.randn(2, 3, 64, 64)
    export = torch.load(tmp_path / "resnet50.pth", weights_only=True)
    net = getattr(torchvision.models, export["torchvision"])()
    net.conv1 = torch.nn.Conv2d(2, 64, 7, 2, 3, bias=False)   # a Sobel network reads 2 channels
    missing, _ = net.load_state_dict(export["state_dict"], strict=False)
    net.fc = torch.nn.Identity()                                # missing: the 1000-way fc only
    front = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1, bias=False),
                                torch.nn.Conv2d(1, 2, 3, padding=1, bias=False))
    front.load_state_dict(export["front_end"])
    with torch.no_grad():
        features = net.eval()(front(images))
        assert {key.split(".")[0] for key in missing} == {"fc"}
        assert close(features, dc_net.representation(images))


def test_a_file_of_the_first_export_layout_still_loads(tmp_path):
    """Files exported before the metadata: a bare torchvision state dict."""
    net = trained_looking("resnet18", 64, sobel=True, fc_dim=0)
    name, state = torchvision_state_dict(net, "resnet18")
    torch.save(state, tmp_path / f"{name}.pth")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert close(load_backbone(tmp_path / f"{name}.pth").eval()(images),
                     net.representation(images))


@pytest.mark.parametrize("arch, name, crop, fc_dim, last", [
    ("resnet50", "resnet50", 64, 0, "fc"),
    ("vgg16", "vgg16_bn", 224, 4096, "classifier.6"),
])
def test_exported_weights_fit_torchvision_with_only_the_last_layer_missing(
        arch, name, crop, fc_dim, last):
    """Keys and shapes, on the meta device: the full-size networks are not allocated."""
    with torch.device("meta"):
        net = build_model(ModelConfig(arch=arch, sobel=False, fc_dim=fc_dim), crop)
        target = getattr(torchvision.models, name)()
    exported, state = torchvision_state_dict(net, arch)
    assert exported == name
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected and {k.rsplit(".", 1)[0] for k in missing} == {last}


def test_torchvision_names_are_refused_for_a_network_torchvision_lacks():
    with pytest.raises(ExportError, match="alexnet.*BatchNorm"):
        torchvision_state_dict(trained_looking("alexnet", 64, True, 64), "alexnet")


def test_export_command_writes_a_runs_backbone(digits_subset, tmp_path, capsys):
    configure_logging()
    run = train(load_config(CONFIGS / "mmdc_resnet18.yaml", [
        f"data.path={digits_subset}", f"runs_root={tmp_path}", "epochs=1", "mmdc.rotation=false",
        "data.crop_size=16", "data.resize_size=16",
        "data.workers=1", "tracking.enabled=false", "progress=never", "threads=1"]))
    out = tmp_path / "backbone.pth"
    assert main(["export", str(run.run_dir), str(out)]) == 0
    printed, logged = capsys.readouterr()
    assert "resnet18 backbone" in printed and "torch.hub.load" in printed
    assert "(epoch 1)" in logged and "(epoch 1) (epoch 1)" not in logged
    payload = torch.load(run.checkpoint, weights_only=False)
    export = torch.load(out, weights_only=True)
    assert export["torchvision"] == "resnet18" and export["crop_size"] == 16
    assert [export["mean"], export["std"]] == list(map(list, normalization(False)))
    state = export["state_dict"]
    assert torch.equal(state["layer4.1.bn2.running_var"],
                       payload["model"]["backbone.body.7.1.bn2.running_var"])
    assert main(["export", str(CONFIGS / "demo.yaml"), str(tmp_path / "x.pth")]) == 2
