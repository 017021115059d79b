"""Multi-crop (data.crops) in both loaders, on real JPEGs: the views' number, shapes and order,
their randomness keyed by (seed, epoch, position, index, view) so a resumed pass repeats the
full pass's crops, the two loaders cropping the same windows, and the key's validation."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dcluster.cli import main
from dcluster.core.config import ConfigError, DataConfig
from dcluster.methods import load_config
from dcluster.data import FolderSource
from dcluster.data.crops import Augmentation, sample_crop, sample_generator, training_views
from dcluster.data.dali_loader import DaliPipelines
from dcluster.data.torchvision_loader import TorchvisionPipelines
from images import jpeg_bytes, photo, write_photo_tree

CROP = 24
CLASSES = {"ant": 4, "bee": 5, "cat": 4}  # 13 images: batches of 4 leave a partial one
ORDER = [3, 3, 0, 12, 5, 3, 7, 7, 2, 9, 11]  # repeats, as a balanced sampler makes them
GROUPS = [{"size": 24, "count": 2, "scale": [0.3, 1.0]},
          {"size": 12, "count": 3, "scale": [0.05, 0.3]}]
SIZES = [24, 24, 12, 12, 12]
LEVEL = 1 / 255 / 0.225  # one grey level after normalisation (the smallest ImageNet std)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_photo_tree(tmp_path_factory.mktemp("photos"), CLASSES)


def config(path: Path, workers: int, **data) -> DataConfig:
    return DataConfig(path=str(path), crop_size=CROP, resize_size=28, min_scale=0.2,
                      workers=workers, **data)


def dali(path: Path, seed: int = 0, **data) -> DaliPipelines:
    return DaliPipelines(FolderSource(path), config(path, 2, **data), seed)


def torchvision(path: Path, seed: int = 0, workers: int = 0, **data) -> TorchvisionPipelines:
    return TorchvisionPipelines(FolderSource(path), config(path, workers, **data), seed)


LOADERS = pytest.mark.parametrize("make", [dali, torchvision], ids=["dali", "torchvision"])


def views_of(pipes, order=ORDER, epoch=1, batch_size=4, start=0):
    """Each view over the pass (concatenated over its batches), the batches, the indices."""
    batches = list(pipes.train_batches(order, epoch, batch_size, start))
    views = [torch.cat([b.views[v] for b in batches]) for v in range(len(batches[0].views))]
    return views, batches, torch.cat([b.indices for b in batches])


@LOADERS
def test_views_have_the_declared_sizes_and_count_in_order(tree, make):
    views, batches, indices = views_of(make(tree, crops=GROUPS))
    assert indices.tolist() == ORDER
    assert [b.next_position for b in batches] == [4, 8, 11]
    for batch in batches:
        assert [tuple(v.shape) for v in batch.views] == [(len(batch.indices), 3, s, s)
                                                         for s in SIZES]
        assert batch.images is batch.views[0]
        assert all(v.dtype == torch.float32 for v in batch.views)
    # normalised like the training crop: roughly centred, not in [0, 1]
    assert all(v.min() < 0 < v.max() for v in views)


@LOADERS
def test_the_views_of_one_image_differ(tree, make):
    views, _, _ = views_of(make(tree, crops=GROUPS))
    for image in range(len(ORDER)):
        assert not torch.equal(views[0][image], views[1][image])
        assert all(not torch.equal(views[a][image], views[b][image])
                   for a, b in [(2, 3), (2, 4), (3, 4)])
    # and one image at two positions of the epoch gets other crops (ORDER[0] == ORDER[1])
    assert not torch.equal(views[0][0], views[0][1])


@LOADERS
@pytest.mark.parametrize("start", [5, 8, 10])
def test_a_resumed_pass_yields_the_tail_of_the_full_pass(tree, make, start):
    pipes = make(tree, crops=GROUPS)
    full, _, _ = views_of(pipes, epoch=4)
    tail, batches, indices = views_of(pipes, epoch=4, start=start)
    assert indices.tolist() == ORDER[start:]
    assert [b.next_position for b in batches] == [min(p, 11) for p in range(start + 4, 15, 4)]
    assert len(tail) == len(SIZES)
    for got, whole in zip(tail, full):
        assert torch.equal(got, whole[start:])


def test_torchvision_views_do_not_depend_on_workers_or_batching(tree):
    in_process, _, _ = views_of(torchvision(tree, crops=GROUPS))
    in_workers, _, _ = views_of(torchvision(tree, workers=2, crops=GROUPS), batch_size=3)
    assert all(torch.equal(a, b) for a, b in zip(in_process, in_workers))


def test_dali_and_torchvision_crop_the_same_window_for_each_view(tree):
    dali_views, _, _ = views_of(dali(tree, seed=3, crops=GROUPS))
    tv_views, _, _ = views_of(torchvision(tree, seed=3, crops=GROUPS))
    for number, (a, b) in enumerate(zip(dali_views, tv_views)):
        diff = (a - b).abs()
        # as test_dali_loader's training crops: the same windows and flips; only the
        # resampling filter at the crop's border differs
        assert diff[:, :, 1:-1, 1:-1].max() <= 1.5 * LEVEL, number
        assert diff.mean() <= 0.5 * LEVEL and diff.max() <= 12 * LEVEL, number
    # the windows differ from view to view, so agreeing is not a property of any crop
    assert (dali_views[0] - tv_views[1]).abs().mean() > 10 * LEVEL


def test_rotated_views_agree_between_the_loaders(tree):
    data = dict(seed=3, crops=GROUPS, rotation_degrees=25.0)
    dali_views, _, _ = views_of(dali(tree, **data))
    tv_views, _, _ = views_of(torchvision(tree, **data))
    for a, b in zip(dali_views, tv_views):
        diff = (a - b).abs()
        # as test_dali_loader's rotated crops: the resampling where the image meets the black
        # corners aside, a rounding step or two
        assert diff.mean() <= 1.0 * LEVEL and torch.quantile(diff.flatten(), 0.95) <= 2 * LEVEL


def test_each_view_draws_its_groups_scale_from_its_own_key():
    cfg = config(Path("."), 0, crops=GROUPS)
    views = training_views(cfg)
    assert [v.size for v in views] == SIZES and [v.number for v in views] == list(range(5))
    assert [(v.augmentation.min_scale, v.augmentation.max_scale) for v in views] == \
        [(0.3, 1.0)] * 2 + [(0.05, 0.3)] * 3
    for view in views:
        got = view.augmentation.sample(sample_generator(0, 1, 2, 3, view.number), 400, 600)
        area = got.height * got.width / (400 * 600)
        assert view.augmentation.min_scale * 0.9 <= area <= view.augmentation.max_scale * 1.1
    # without data.crops: the one crop, keyed as before multi-crop existed
    (single,) = training_views(config(Path("."), 0))
    assert single.number is None and single.size == CROP
    assert single.augmentation == Augmentation(min_scale=0.2)
    assert single.augmentation.sample(sample_generator(0, 1, 2, 3), 40, 60) == \
        sample_crop(np.random.default_rng([0, 1, 2, 3]), 40, 60, 0.2)


@pytest.mark.parametrize("crops, key, why", [
    ("[{size: 24, count: 2, scale: [0.14, 1.0]}, {size: 96, count: 6, scale: [0.5, 0.14]}]",
     "data.crops[1].scale", "0 < min <= max <= 1"),
    ("[{size: 24, count: 2, scale: [0.0, 1.0]}]", "data.crops[0].scale", "0 < min"),
    ("[{size: 24, count: 2, scale: [0.5, 1.5]}]", "data.crops[0].scale", "max <= 1"),
    ("[{size: 0, count: 2, scale: [0.1, 1.0]}]", "data.crops[0].size", "at least 1"),
    ("[{size: 24, count: 0, scale: [0.1, 1.0]}]", "data.crops[0].count", "at least 1"),
    ("[{size: 24, count: 2}]", "data.crops[0]", "size, count and scale"),
    ("[{size: 24, count: 2, scale: [0.1, 1.0], ratio: 1}]", "data.crops[0]", "size, count"),
    ("[{size: 24, count: 2, scale: [0.1, 1.0]}, 3]", "data.crops[1]", "must be a mapping"),
], ids=["min-above-max", "zero-min", "max-above-1", "size", "count", "no-scale", "unknown",
        "not-a-mapping"])
def test_a_bad_crops_value_is_one_line_naming_its_key(crops, key, why, tmp_path, capsys):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load_config(None, [f"data.path={tmp_path}", "name=x", f"data.crops={crops}"])
    code = main(["train", "configs/demo.yaml", f"data.path={tmp_path}",
                 f"runs_root={tmp_path / 'runs'}", f"data.crops={crops}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if ": error: " in line]
    assert f"'{key}'" in line and why in line, line
    assert not (tmp_path / "runs").exists()


def test_a_bad_group_in_a_yaml_file_is_named_too(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("data:\n  crops: [{size: 24, count: 2, scale: [0.1, 1.0]}, 7]\n")
    with pytest.raises(ConfigError, match=re.escape("preset.yaml: config key 'data.crops[1]' = 7")):
        load_config(preset, [f"data.path={tmp_path}", "name=x"])


def test_crops_and_crop_sides_are_not_combined(tmp_path):
    with pytest.raises(ConfigError, match="'data.crops'.*crop_sides"):
        load_config(None, [f"data.path={tmp_path}", "name=x", "data.crop_sides=[16]",
                           "data.crops=[{size: 24, count: 2, scale: [0.1, 1.0]}]"])


def test_a_good_crops_value_loads_as_plain_groups(tmp_path):
    cfg = load_config(None, [f"data.path={tmp_path}", "name=x",
                             "data.crops=[{size: 224, count: 2, scale: [0.14, 1.0]}, "
                             "{size: 96, count: 6, scale: [0.05, 0.14]}]"])
    assert cfg.data.crops == [{"size": 224, "count": 2, "scale": [0.14, 1.0]},
                              {"size": 96, "count": 6, "scale": [0.05, 0.14]}]
    assert [v.size for v in training_views(cfg.data)] == [224] * 2 + [96] * 6


def test_an_image_only_dali_rejects_leaves_every_view_of_the_others(tmp_path):
    """After DALI fails a batch, decoding it image by image keeps each view of the good ones."""
    root = write_photo_tree(tmp_path / "photos", {"a": 5})
    data = jpeg_bytes(photo(3))
    dht = data.find(b"\xff\xc4")  # the counts of the first Huffman table zeroed
    (root / "a" / "900_huffman.jpg").write_bytes(data[:dht + 5] + bytes(16) + data[dht + 21:])
    pipes = DaliPipelines(FolderSource(root), config(root, 2, crops=GROUPS,
                                                     max_bad_fraction=0.5), 0)
    broken = pipes.source.relpaths.index("a/900_huffman.jpg")
    order = [0, broken, 1, 2, broken, 3, 4]
    views, batches, indices = views_of(pipes, order, epoch=0, batch_size=3)
    assert [b.indices.tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert [b.next_position for b in batches] == [3, 6, 7]
    assert list(pipes.bad_indices) == [broken]
    assert [tuple(v.shape) for v in views] == [(5, 3, s, s) for s in SIZES]
    clean, _, _ = views_of(pipes, order, epoch=0, batch_size=1)
    assert all(torch.equal(a, b) for a, b in zip(views, clean))
