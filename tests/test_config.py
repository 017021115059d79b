"""Config loading: presets, overrides, and errors that name the key before any data is read."""
from pathlib import Path

import pytest
import torch

from dcluster.core.config import ConfigError
from dcluster.core.config_settings import config_hash, hashed_settings, setting_changes
from dcluster.methods import Config, load_config
from dcluster.models import build_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    return tmp_path / "images"


def test_alexnet_preset_has_the_papers_settings(data_dir):
    cfg = load_config(CONFIGS / "deepcluster_alexnet_imagenet.yaml", [f"data.path={data_dir}"])
    assert cfg.model.arch == "alexnet" and cfg.model.sobel and cfg.model.dropout > 0
    assert cfg.clustering.k == 10000 and cfg.clustering.pca_dim == 256
    assert cfg.clustering.whiten and cfg.clustering.l2_normalize
    assert cfg.clustering.niter == 20 and cfg.clustering.max_points_per_centroid == 0
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.05, 0.9, 1e-5)
    assert cfg.optim.global_batch == 256 and cfg.epochs == 500 and cfg.clustering.every == 1


def test_resnet50_preset_clusters_the_2048_pooled_features_behind_sobel(data_dir):
    cfg = load_config(CONFIGS / "deepcluster_resnet50_imagenet.yaml", [f"data.path={data_dir}"])
    assert cfg.model.arch == "resnet50" and cfg.model.sobel and cfg.model.fc_dim == 0
    assert cfg.clustering.k == 10000 and cfg.clustering.pca_dim == 256
    assert cfg.clustering.whiten and cfg.clustering.l2_normalize
    with torch.device("meta"):  # shapes only: the full-size network is not allocated
        net = build_model(cfg.model, cfg.data.crop_size)
    assert net.feature_dim == 2048 and net.body[0].in_channels == 2


@pytest.mark.parametrize("preset", ["deepcluster_vgg16_imagenet.yaml", "demo.yaml",
                                    "mmdc_mnist.yaml", "deepcluster_mnist5k.yaml",
                                    "deepcluster_mnist.yaml", "mmdc_mnist_authors.yaml",
                                    "mmdc_mnist5k.yaml"])
def test_other_presets_load(preset, data_dir):
    cfg = load_config(CONFIGS / preset, [f"data.path={data_dir}"])
    assert cfg.data.path == str(data_dir)


def test_overrides_apply_with_types(data_dir):
    cfg = load_config(CONFIGS / "demo.yaml", [f"data.path={data_dir}", "optim.lr=0.5",
                                              "clustering.k=7", "model.sobel=false"])
    assert cfg.optim.lr == 0.5 and cfg.clustering.k == 7 and cfg.model.sobel is False


def test_unknown_key_unlike_any_is_named_with_its_sections_keys(data_dir):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [f"data.path={data_dir}", "optim.learning_rate=0.1"])
    assert "learning_rate" in str(err.value) and "the keys of optim: optim.lr," in str(err.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path, data_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: x\ndata:\n  path: {data_dir}\nclustering:\n  kk: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "bad.yaml" in str(err.value) and "kk" in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("clustering.k=-5", "clustering.k"),
    ("optim.lr=0", "optim.lr"),
    ("model.dropout=1.5", "model.dropout"),
    ("model.arch=resnet", "model.arch"),
    ("clustering.method=dbscan", "clustering.method"),
    ("data.resize_size=16", "data.resize_size"),
    ("clustering.pca_sample=50", "clustering.pca_sample"),  # demo.yaml: pca_dim 64
    ("data.crop_sides=[24,0]", "data.crop_sides"),
    ("data.rotation_degrees=200", "data.rotation_degrees"),
])
def test_bad_values_name_the_key(override, key, data_dir):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [f"data.path={data_dir}", override])
    assert key in str(err.value)


def test_wrong_type_names_the_key(data_dir):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [f"data.path={data_dir}", "clustering.k=many"])
    assert "clustering.k" in str(err.value) and "many" in str(err.value)


def test_missing_data_path_is_an_error_before_reading(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [f"data.path={tmp_path / 'nowhere'}"])
    assert "data.path" in str(err.value) and "nowhere" in str(err.value)


def test_required_name_is_reported(data_dir, tmp_path):
    cfg_file = tmp_path / "noname.yaml"
    cfg_file.write_text(f"data:\n  path: {data_dir}\n")
    with pytest.raises(ConfigError, match="name"):
        load_config(cfg_file)


def test_hash_ignores_execution_only_keys(data_dir):
    a = load_config(CONFIGS / "demo.yaml", [f"data.path={data_dir}"])
    b = load_config(CONFIGS / "demo.yaml", [f"data.path={data_dir}", "epochs=99", "data.workers=3"])
    c = load_config(CONFIGS / "demo.yaml", [f"data.path={data_dir}", "clustering.k=11"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert setting_changes(hashed_settings(a), hashed_settings(c), Config) == [("clustering.k", 30, 11)]


@pytest.mark.parametrize("override, key", [
    ("clustering.features=both", "clustering.features"),
    ("clustering.bank.dtype=float8", "clustering.bank.dtype"),
    ("clustering.bank.memory=disk", "clustering.bank.memory"),
    ("clustering.bank.max_age=0", "clustering.bank.max_age"),
])
def test_feature_bank_settings_are_checked(data_dir, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(CONFIGS / "demo.yaml", [f"data.path={data_dir}",
                                            "clustering.features=training_pass", override])


def test_the_feature_bank_is_deepclusters_alone(data_dir):
    with pytest.raises(ConfigError, match="'clustering.features' = 'training_pass'.*DeepCluster"):
        load_config(CONFIGS / "mmdc_demo.yaml", [f"data.path={data_dir}",
                                                 "clustering.features=training_pass"])
