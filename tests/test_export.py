"""`dcluster export`: a backbone's weights under torchvision's names load into
torchvision.models.X() with only its last layer missing, and give dcluster's features."""
from pathlib import Path

import pytest
import torch
import torchvision

from dcluster import load_backbone
from dcluster.cli import main
from dcluster.core.config import ModelConfig, load_config
from dcluster.export import ExportError, SobelBackbone, torchvision_state_dict
from dcluster.core.logs import configure_logging
from dcluster.models import build_model
from dcluster.train import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def trained_looking(arch: str, crop: int, sobel: bool, fc_dim: int):
    """A dcluster network with BatchNorm statistics of its own, as training leaves them."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch=arch, sobel=sobel, fc_dim=fc_dim, dropout=0.5), crop)
    with torch.no_grad():
        for name, buffer in net.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    return net.eval()


def test_exported_resnet_behind_sobel_gives_dcluster_features(tmp_path):
    net = trained_looking("resnet18", 64, sobel=True, fc_dim=0)
    name, state = torchvision_state_dict(net, "resnet18")
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    loaded = load_backbone(path).eval()
    assert isinstance(loaded, SobelBackbone)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(images), net.representation(images), atol=1e-5)


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


def test_a_network_without_torchvision_counterpart_is_refused():
    with pytest.raises(ExportError, match="alexnet.*BatchNorm"):
        torchvision_state_dict(trained_looking("alexnet", 224, True, 64), "alexnet")


def test_export_command_writes_a_runs_backbone(digits_subset, tmp_path, capsys):
    configure_logging()
    run = train(load_config(CONFIGS / "mmdc_resnet18.yaml", [
        f"data.path={digits_subset}", f"runs_root={tmp_path}", "epochs=1", "mmdc.rotation=false",
        "data.crop_size=16", "data.resize_size=16",
        "data.workers=1", "tracking.enabled=false", "progress=never", "threads=1"]))
    out = tmp_path / "backbone.pth"
    assert main(["export", str(run.run_dir), str(out)]) == 0
    assert "torchvision.models.resnet18" in capsys.readouterr().out
    payload = torch.load(run.checkpoint, weights_only=False)
    state = torch.load(out, weights_only=True)
    assert torch.equal(state["layer4.1.bn2.running_var"],
                       payload["model"]["backbone.body.7.1.bn2.running_var"])
    assert main(["export", str(CONFIGS / "demo.yaml"), str(tmp_path / "x.pth")]) == 2
