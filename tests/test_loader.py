"""The torchvision pipelines: order, coverage, reproducibility, resume and bad files."""
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from dcluster.core.config import DataConfig
from dcluster.data import FolderSource, TooManyBadImagesError, build_pipelines, num_batches
from dcluster.data.torchvision_loader import TorchvisionPipelines
from dcluster.data.crops import sample_crop
from images import write_photo_tree
from loader_passes import (assert_bad_files_skipped, assert_too_many_bad_files_stop_the_pass,
                           feature_pass, train_pass, write_tree_with_bad_files)

CROP = 24
CLASSES = {"ant": 4, "bee": 5, "cat": 4}  # 13 images: batches of 4 leave a partial one


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_photo_tree(tmp_path_factory.mktemp("photos"), CLASSES)


def pipelines(path: Path, workers: int = 0, seed: int = 0, **data) -> TorchvisionPipelines:
    cfg = DataConfig(path=str(path), crop_size=CROP, resize_size=28, min_scale=0.2,
                     workers=workers, **data)
    return TorchvisionPipelines(FolderSource(path), cfg, seed)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shard", ["all", "every_third_from_1", "shuffled"])
def test_feature_pass_yields_each_given_index_once_in_order(tree, workers, shard):
    everything = np.arange(len(FolderSource(tree)))
    indices = {"all": everything, "every_third_from_1": everything[1::3],
               "shuffled": np.random.default_rng(3).permutation(everything)}[shard]
    images, got, batches = feature_pass(pipelines(tree, workers), indices.tolist())
    assert got.dtype == torch.int64 and got.tolist() == indices.tolist()
    assert images.shape == (len(indices), 3, CROP, CROP) and images.dtype == torch.float32
    assert [len(b.indices) for b in batches][:-1] == [4] * (len(batches) - 1)
    assert len(batches) == num_batches(len(indices), 4)


def test_feature_crops_depend_only_on_the_image(tree):
    full, order, _ = feature_pass(pipelines(tree, workers=2), list(range(13)))
    shard, _, _ = feature_pass(pipelines(tree, seed=5), [12, 3, 7], batch_size=2)
    assert torch.equal(shard, full[[12, 3, 7]])
    # Normalised with the ImageNet statistics: roughly centred, not in [0, 1].
    assert full.min() < 0 < full.max()


ORDER = [3, 3, 0, 12, 5, 3, 7, 7, 2, 9, 11]  # repeats, as a balanced sampler makes them


def test_train_pass_follows_the_order_with_repeats(tree):
    images, got, batches = train_pass(pipelines(tree), ORDER, epoch=0)
    assert got.tolist() == ORDER
    assert all(len(b.views) == 1 and b.images is b.views[0] for b in batches)
    assert [b.next_position for b in batches] == [4, 8, 11]
    assert images.shape == (len(ORDER), 3, CROP, CROP)
    # The same image at two positions of one epoch gets two different augmentations.
    assert not torch.equal(images[0], images[1])


def test_train_pass_is_bit_identical_across_workers_and_global_rng(tree):
    torch.manual_seed(1), np.random.seed(1)
    in_process, _, _ = train_pass(pipelines(tree, workers=0, seed=7), ORDER, epoch=2)
    torch.manual_seed(2), np.random.seed(2)
    in_workers, _, _ = train_pass(pipelines(tree, workers=2, seed=7), ORDER, epoch=2,
                                  batch_size=3)
    assert torch.equal(in_process, in_workers)


def test_augmentation_changes_with_epoch_and_seed(tree):
    epoch0, _, _ = train_pass(pipelines(tree), ORDER, epoch=0)
    epoch1, _, _ = train_pass(pipelines(tree), ORDER, epoch=1)
    other_seed, _, _ = train_pass(pipelines(tree, seed=1), ORDER, epoch=0)
    differs = lambda a, b: [not torch.equal(x, y) for x, y in zip(a, b)]
    assert sum(differs(epoch0, epoch1)) >= len(ORDER) - 1
    assert sum(differs(epoch0, other_seed)) >= len(ORDER) - 1


@pytest.mark.parametrize("start", [0, 5, 8, 11])
def test_resume_from_a_position_repeats_the_uninterrupted_tail(tree, start):
    full, _, _ = train_pass(pipelines(tree), ORDER, epoch=4)
    batches = list(pipelines(tree).train_batches(ORDER, 4, 4, start))
    assert [b.next_position for b in batches] == [min(p, 11) for p in range(start + 4, 15, 4)]
    tail = [b.images for b in batches] or [torch.empty(0, 3, CROP, CROP)]
    assert torch.equal(torch.cat(tail), full[start:])
    assert [i for b in batches for i in b.indices.tolist()] == ORDER[start:]


def test_out_of_range_indices_and_positions_are_refused(tree):
    pipes = pipelines(tree)
    with pytest.raises(IndexError, match="outside 0..12"):
        list(pipes.feature_batches([0, 13], 4))
    with pytest.raises(ValueError, match="start_position"):
        list(pipes.train_batches(ORDER, 0, 4, start_position=12))


@pytest.fixture(scope="module")
def tree_with_bad_files(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    return write_tree_with_bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_counted_and_listed(tree_with_bad_files, workers, caplog):
    root, bad = tree_with_bad_files
    pipes = pipelines(root, workers, max_bad_fraction=0.3)
    caplog.set_level(logging.WARNING, logger="dcluster.data")
    _, got, _ = feature_pass(pipes, list(range(len(pipes.source))))
    assert_bad_files_skipped(pipes, root, bad, got, caplog)
    for rel in bad:  # each one in a warning of its own, too
        assert any(str(root / rel) in r.getMessage() for r in caplog.records)


def test_train_pass_skips_bad_files_but_keeps_counting_positions(tree_with_bad_files):
    root, bad = tree_with_bad_files
    pipes = pipelines(root, max_bad_fraction=0.5)
    zero = pipes.source.relpaths.index("a/000_zero.jpg")
    good = [i for i, rel in enumerate(pipes.source.relpaths) if rel not in bad]
    order = [good[0], zero, good[1], zero, good[2], good[3]]
    batches = list(pipes.train_batches(order, 0, 2))
    assert [b.indices.tolist() for b in batches] == [[good[0]], [good[1]], good[2:4]]
    assert [b.next_position for b in batches] == [2, 4, 6]
    assert list(pipes.bad_indices) == [zero]


def test_too_many_bad_files_stop_the_pass_naming_them(tree_with_bad_files):
    root, _ = tree_with_bad_files
    assert_too_many_bad_files_stop_the_pass(pipelines(root, max_bad_fraction=0.1), root)


def test_zero_tolerance_stops_at_the_first_bad_file(tree_with_bad_files):
    root, _ = tree_with_bad_files
    pipes = pipelines(root, max_bad_fraction=0.0)
    zero = pipes.source.relpaths.index("a/000_zero.jpg")
    with pytest.raises(TooManyBadImagesError, match="000_zero.jpg"):
        list(pipes.feature_batches([0, zero, 2], 1))


def test_build_pipelines_picks_the_configured_loader(tree):
    cfg = DataConfig(path=str(tree), loader="torchvision")
    assert isinstance(build_pipelines(FolderSource(tree), cfg, 0), TorchvisionPipelines)
    cfg.loader = "nope"
    with pytest.raises(ValueError, match="unknown data.loader 'nope'"):
        build_pipelines(FolderSource(tree), cfg, 0)


@pytest.mark.parametrize("height, width", [(48, 64), (64, 40), (30, 300), (300, 30), (5, 5)])
def test_random_crops_stay_inside_the_image(height, width):
    for key in range(200):
        p = sample_crop(np.random.default_rng(key), height, width, min_scale=0.08)
        assert 0 <= p.top and p.top + p.height <= height
        assert 0 <= p.left and p.left + p.width <= width
        assert p.height > 0 and p.width > 0


def test_random_crops_cover_the_scale_and_ratio_ranges_and_flip_half_the_time():
    crops = [sample_crop(np.random.default_rng(key), 120, 160, 0.2) for key in range(400)]
    areas = np.array([p.height * p.width / (120 * 160) for p in crops])
    ratios = np.array([p.width / p.height for p in crops])
    assert areas.min() > 0.19 and areas.max() > 0.9 and 0.45 < np.median(areas) < 0.75
    assert ratios.min() > 3 / 4 - 0.03 and ratios.max() < 4 / 3 + 0.03
    assert ratios.min() < 0.8 and ratios.max() > 1.25
    assert 160 < sum(p.flip for p in crops) < 240
    again = [sample_crop(np.random.default_rng(key), 120, 160, 0.2) for key in range(400)]
    assert again == crops


def test_switching_flips_off_keeps_every_box_and_never_flips():
    crops = [sample_crop(np.random.default_rng(key), 120, 160, 0.2) for key in range(100)]
    plain = [sample_crop(np.random.default_rng(key), 120, 160, 0.2, flip=False)
             for key in range(100)]
    assert not any(p.flip for p in plain) and any(p.flip for p in crops)
    assert [dataclasses.replace(p, flip=False) for p in crops] == plain


def test_square_crops_take_each_listed_side_inside_the_image_clamped_to_small_images():
    crops = [sample_crop(np.random.default_rng(key), 28, 28, 0.2, crop_sides=(24, 20, 16))
             for key in range(300)]
    sides = [p.height for p in crops]
    assert all(p.height == p.width for p in crops) and set(sides) == {24, 20, 16}
    assert all(70 < sides.count(side) < 130 for side in (24, 20, 16))
    assert all(0 <= p.top <= 28 - p.height and 0 <= p.left <= 28 - p.width for p in crops)
    assert len({(p.top, p.left) for p in crops if p.height == 16}) > 30  # placed anywhere
    small = sample_crop(np.random.default_rng(0), 18, 40, 0.2, crop_sides=(24,))
    assert (small.top, small.height, small.width) == (0, 18, 18)


def test_rotation_draws_the_angle_last_and_leaves_boxes_and_coins_alone():
    rotated = [sample_crop(np.random.default_rng(key), 120, 160, 0.2, rotation_degrees=25)
               for key in range(200)]
    plain = [sample_crop(np.random.default_rng(key), 120, 160, 0.2) for key in range(200)]
    angles = np.array([p.angle for p in rotated])
    assert np.abs(angles).max() <= 25 and angles.min() < -20 and angles.max() > 20
    assert [dataclasses.replace(p, angle=0.0) for p in rotated] == plain
    assert all(p.angle == 0.0 for p in plain)


def test_extreme_aspect_ratio_falls_back_to_a_clamped_centre_crop():
    p = sample_crop(np.random.default_rng(0), 10, 1000, min_scale=0.9)
    assert (p.top, p.height) == (0, 10) and p.width == round(10 * 4 / 3)
    assert p.left == (1000 - p.width) // 2
