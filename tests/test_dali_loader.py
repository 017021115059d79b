"""The DALI pipelines on the CPU: order, coverage and the partial tail, agreement with the
torchvision loader, reproducibility, resume, pipeline reuse, and every bad-input case."""
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcluster.core.config import ConfigError, DataConfig
from dcluster.data import FolderSource, build_pipelines, num_batches
from dcluster.data.torchvision_loader import TorchvisionPipelines
from dcluster.data import dali_loader
from dcluster.data.dali_loader import DaliPipelines
from dcluster.data.crops import IMAGENET_MEAN, IMAGENET_STD, Augmentation
from images import (jpeg_bytes, photo, write_cmyk_jpeg, write_grayscale_jpeg, write_photo_tree,
                    write_png)
from loader_passes import (assert_bad_files_skipped, assert_too_many_bad_files_stop_the_pass,
                           feature_pass, train_pass, write_tree_with_bad_files)

CROP = 24
CLASSES = {"ant": 4, "bee": 5, "cat": 4}  # 13 images: batches of 4 leave a partial one
ORDER = [3, 3, 0, 12, 5, 3, 7, 7, 2, 9, 11]  # repeats, as a balanced sampler makes them
LEVEL = 1 / 255 / 0.225  # one grey level after normalisation (the smallest ImageNet std)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_photo_tree(tmp_path_factory.mktemp("photos"), CLASSES)


def config(path: Path, workers: int = 2, **data) -> DataConfig:
    return DataConfig(path=str(path), crop_size=CROP, resize_size=28, min_scale=0.2,
                      workers=workers, **data)


def dali(path: Path, workers: int = 2, seed: int = 0, **data) -> DaliPipelines:
    return DaliPipelines(FolderSource(path), config(path, workers, **data), seed)


def torchvision(path: Path, seed: int = 0, **data) -> TorchvisionPipelines:
    return TorchvisionPipelines(FolderSource(path), config(path, 0, **data), seed)


@pytest.mark.parametrize("shard", ["all", "rank_0_of_2", "rank_1_of_2", "every_third_from_1",
                                   "shuffled"])
def test_feature_pass_yields_each_given_index_once_in_order(tree, shard):
    everything = np.arange(13)
    indices = {"all": everything, "rank_0_of_2": everything[0::2],
               "rank_1_of_2": everything[1::2], "every_third_from_1": everything[1::3],
               "shuffled": np.random.default_rng(3).permutation(everything)}[shard]
    images, got, batches = feature_pass(dali(tree), indices.tolist())
    assert got.dtype == torch.int64 and got.tolist() == indices.tolist()
    assert images.shape == (len(indices), 3, CROP, CROP) and images.dtype == torch.float32
    sizes = [len(b.indices) for b in batches]
    assert len(batches) == num_batches(len(indices), 4)
    assert sizes[:-1] == [4] * (len(batches) - 1) and sizes[-1] == len(indices) - 4 * (len(batches) - 1)


def test_two_ranks_cover_every_image_once_with_the_crops_of_one_rank(tree):
    whole, _, _ = feature_pass(dali(tree), list(range(13)))
    rank0, got0, _ = feature_pass(dali(tree), list(range(0, 13, 2)), batch_size=3)
    rank1, got1, _ = feature_pass(dali(tree), list(range(1, 13, 2)), batch_size=3)
    assert sorted(got0.tolist() + got1.tolist()) == list(range(13))
    assert torch.equal(rank0, whole[0::2]) and torch.equal(rank1, whole[1::2])


def test_partial_tail_of_one_and_a_single_batch_pass(tree):
    pipes = dali(tree)
    _, got, batches = feature_pass(pipes, [12, 0, 5, 7, 9], batch_size=4)
    assert [b.indices.tolist() for b in batches] == [[12, 0, 5, 7], [9]]
    _, got, batches = feature_pass(pipes, [6], batch_size=4)
    assert [b.indices.tolist() for b in batches] == [[6]]
    assert list(pipes.feature_batches([], 4)) == []


def test_centre_crops_match_the_torchvision_loader(tree):
    dali_images, _, _ = feature_pass(dali(tree), list(range(13)))
    tv_images, _, _ = feature_pass(torchvision(tree), list(range(13)))
    # Same decoder library, same sampling points: at most a rounding step apart.
    assert (dali_images - tv_images).abs().max() <= 1.5 * LEVEL


@pytest.mark.parametrize("data", [{}, {"crop_sides": [24, 20, 16]}], ids=["resized", "squares"])
def test_train_crops_are_the_torchvision_loader_crops(tree, data):
    dali_images, _, _ = train_pass(dali(tree, seed=3, **data), ORDER, epoch=1)
    tv_images, _, _ = train_pass(torchvision(tree, seed=3, **data), ORDER, epoch=1)
    diff = (dali_images - tv_images).abs()
    # The same windows and flips; only the resampling filter at the crop's border differs.
    assert diff[:, :, 1:-1, 1:-1].max() <= 1.5 * LEVEL
    assert diff.mean() <= 0.5 * LEVEL and diff.max() <= 12 * LEVEL


@pytest.mark.parametrize("make", [dali, torchvision], ids=["dali", "torchvision"])
def test_without_flips_the_train_crops_are_the_same_windows_never_mirrored(tree, make):
    flipped, _, _ = train_pass(make(tree, seed=3), ORDER, epoch=1)
    plain, _, _ = train_pass(make(tree, seed=3, flip=False), ORDER, epoch=1)
    same = [torch.allclose(a, b, atol=1e-5) for a, b in zip(flipped, plain)]
    mirrored = [torch.allclose(a, b.flip(-1), atol=1e-5) for a, b in zip(flipped, plain)]
    # data.flip=false keeps every window (the coin is still tossed) and drops only the mirror
    assert all(s != m for s, m in zip(same, mirrored))
    assert 0 < sum(mirrored) < len(ORDER)


def test_rotated_train_crops_are_the_torchvision_loader_crops_turned_the_same_way(
        tree, monkeypatch):
    rotated = dict(seed=3, rotation_degrees=25.0)
    dali_images, _, _ = train_pass(dali(tree, **rotated), ORDER, epoch=1)
    tv_images, _, _ = train_pass(torchvision(tree, **rotated), ORDER, epoch=1)
    unrotated, _, _ = train_pass(dali(tree, seed=3), ORDER, epoch=1)
    sample = Augmentation.sample

    def turned_the_other_way(self, rng, height, width):
        drawn = sample(self, rng, height, width)
        return dataclasses.replace(drawn, angle=-drawn.angle)

    monkeypatch.setattr(Augmentation, "sample", turned_the_other_way)
    turned_back, _, _ = train_pass(torchvision(tree, **rotated), ORDER, epoch=1)
    diff = (dali_images - tv_images).abs()
    # The same angles, windows and flips: apart from the resampling where the image meets the
    # black corners (about 1% of the pixels), a rounding step or two.
    assert diff.mean() <= 1.0 * LEVEL and torch.quantile(diff.flatten(), 0.95) <= 2 * LEVEL
    # DALI's "counter-clockwise" is torchvision's: the other way round would be far off
    assert (dali_images - turned_back).abs().mean() > 10 * LEVEL
    assert (dali_images - unrotated).abs().mean() > 10 * LEVEL


def test_train_pass_follows_the_order_with_repeats(tree):
    images, got, batches = train_pass(dali(tree), ORDER, epoch=0)
    assert got.tolist() == ORDER
    assert all(len(b.views) == 1 and b.images is b.views[0] for b in batches)
    assert [b.next_position for b in batches] == [4, 8, 11]
    assert images.shape == (len(ORDER), 3, CROP, CROP)
    assert not torch.equal(images[0], images[1])  # one image, two positions, two crops


def test_train_pass_is_reproducible_whatever_the_threads_and_batching(tree):
    first, _, _ = train_pass(dali(tree, workers=2, seed=7), ORDER, epoch=2)
    again, _, _ = train_pass(dali(tree, workers=1, seed=7), ORDER, epoch=2, batch_size=3)
    assert torch.equal(first, again)
    other_epoch, _, _ = train_pass(dali(tree, seed=7), ORDER, epoch=3)
    assert sum(not torch.equal(a, b) for a, b in zip(first, other_epoch)) >= len(ORDER) - 1


@pytest.mark.parametrize("start", [0, 5, 8, 11])
def test_resume_from_a_position_repeats_the_uninterrupted_tail(tree, start):
    pipes = dali(tree)
    full, _, _ = train_pass(pipes, ORDER, epoch=4)
    batches = list(pipes.train_batches(ORDER, 4, 4, start))
    assert [b.next_position for b in batches] == [min(p, 11) for p in range(start + 4, 15, 4)]
    tail = [b.images for b in batches] or [torch.empty(0, 3, CROP, CROP)]
    assert torch.equal(torch.cat(tail), full[start:])


def test_pipelines_are_built_once_and_survive_an_abandoned_pass(tree, monkeypatch):
    built = []
    define = dali_loader._define
    monkeypatch.setattr(dali_loader, "_define", lambda kind, *a: built.append(kind) or define(kind, *a))
    pipes = dali(tree)
    reference, _, _ = feature_pass(pipes, list(range(13)))
    for epoch in range(3):
        train_pass(pipes, ORDER, epoch)
        next(iter(pipes.feature_batches(list(range(13)), 4)))  # abandoned after one batch
    again, _, _ = feature_pass(pipes, list(range(13)))
    assert torch.equal(again, reference)
    assert sorted(built) == ["feature", "train"]


def test_out_of_range_indices_and_positions_are_refused(tree):
    pipes = dali(tree)
    with pytest.raises(IndexError, match="outside 0..12"):
        list(pipes.feature_batches([0, 13], 4))
    with pytest.raises(ValueError, match="start_position"):
        list(pipes.train_batches(ORDER, 0, 4, start_position=12))


def test_dali_is_the_default_and_its_absence_names_the_fallback(tree, monkeypatch):
    assert DataConfig().loader == "dali"
    assert isinstance(build_pipelines(FolderSource(tree), config(tree), 0), DaliPipelines)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ConfigError, match="data.loader.*data.loader=torchvision"):
        build_pipelines(FolderSource(tree), config(tree), 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_gpu_decoding_without_a_gpu_is_refused(tree):
    with pytest.raises(ConfigError, match="data.decode_device"):
        dali(tree, decode_device="gpu")


def broken_huffman_jpeg(number: int) -> bytes:
    """Header and end marker intact, so only the decoder can tell: the counts of the first
    Huffman table zeroed."""
    data = jpeg_bytes(photo(number))
    dht = data.find(b"\xff\xc4")
    return data[:dht + 5] + bytes(16) + data[dht + 21:]


@pytest.fixture(scope="module")
def tree_with_bad_files(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    def write_broken_huffman(path: Path) -> None:
        path.write_bytes(broken_huffman_jpeg(3))

    return write_tree_with_bad_files(tmp_path_factory.mktemp("bad"), {
        "b/060_huffman.jpg": ("dali cannot decode", write_broken_huffman)})


def test_bad_files_are_skipped_counted_and_listed(tree_with_bad_files, caplog):
    root, bad = tree_with_bad_files
    pipes = dali(root, max_bad_fraction=0.4)
    caplog.set_level(logging.WARNING, logger="dcluster.data")
    _, got, batches = feature_pass(pipes, list(range(len(pipes.source))))
    assert len(batches) == 3  # each batch loses its bad images; none moves to another batch
    assert_bad_files_skipped(pipes, root, bad, got, caplog)


def test_an_image_only_dali_rejects_costs_its_batch_nothing_else(tree_with_bad_files, caplog):
    root, bad = tree_with_bad_files
    pipes = dali(root, max_bad_fraction=0.5)
    broken = pipes.source.relpaths.index("b/060_huffman.jpg")
    good = [i for i, rel in enumerate(pipes.source.relpaths) if rel not in bad]
    order = [good[0], broken, good[1], good[2], broken, good[3], good[4]]
    images, _, batches = train_pass(pipes, order, epoch=0, batch_size=3)
    assert [b.indices.tolist() for b in batches] == [[good[0], good[1]], [good[2], good[3]],
                                                     [good[4]]]
    assert [b.next_position for b in batches] == [3, 6, 7]
    assert list(pipes.bad_indices) == [broken]
    # The batch decoded one image at a time after the failure holds the usual crops, and
    # the next pass does not feed DALI the broken image again.
    caplog.clear()
    clean = torch.cat([b.images for b in pipes.train_batches(order, 0, 1)])
    assert torch.equal(images, clean)
    assert "DALI failed" not in caplog.text


def test_too_many_bad_files_stop_the_pass_naming_them(tree_with_bad_files):
    root, _ = tree_with_bad_files
    assert_too_many_bad_files_stop_the_pass(dali(root, max_bad_fraction=0.1), root)


@pytest.fixture(scope="module")
def odd_formats(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    write_cmyk_jpeg(root / "cmyk.jpg", 1)
    write_grayscale_jpeg(root / "gray.jpg", 2)
    for number, mode in enumerate(["RGBA", "P", "L"], 3):
        write_png(root / f"{mode}.png", mode, number)
    return root


def test_cmyk_gray_and_png_decode_to_the_same_rgb_as_pillow(odd_formats):
    dali_images, got, _ = feature_pass(dali(odd_formats), list(range(5)))
    tv_images, _, _ = feature_pass(torchvision(odd_formats), list(range(5)))
    assert got.tolist() == list(range(5))
    assert (dali_images - tv_images).abs().max() <= 1.5 * LEVEL
    # The grey JPEG comes out as three equal channels (before normalisation).
    gray = FolderSource(odd_formats).relpaths.index("gray.jpg")
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = dali_images[gray] * std + mean
    assert (pixels - pixels[0]).abs().max() < 1e-5


# ------------------------------------------------- the GPU window-decode probe (issue 21, 6)

def test_the_window_decode_fallback_crops_the_same_training_batches(tree):
    """Whole decode + fn.slice (the fallback for GPUs whose window decode is broken) gives
    the training crops of the window decode, here on the CPU where both run."""
    windowed, whole = dali(tree), dali(tree)
    whole.roi_decode = False
    want, got = train_pass(windowed, ORDER, epoch=1), train_pass(whole, ORDER, epoch=1)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=LEVEL)


@pytest.mark.parametrize("returncode, output, said", [
    (-11, "Segmentation fault (core dumped)", "killed by signal 11"),  # H100
    (1, "RuntimeError: nvImageCodec failure: '#8'", "exit 1: RuntimeError: nvImageCodec"),  # A100
])
def test_a_described_failing_gpu_window_decode_selects_whole_decode_and_says_so(
        returncode, output, said, caplog):
    import subprocess

    def described(command, **kwargs):
        assert command[-3:] == ["-m", "dcluster.data.dali_loader", "0"]
        return subprocess.CompletedProcess(command, returncode, "", output)

    with caplog.at_level(logging.WARNING, logger="dcluster.data"):
        assert dali_loader.roi_decode_choice(dali_loader.probe_roi_decode(0, run=described)) is False
    assert said in caplog.text and "NVIDIA/nvImageCodec#55" in caplog.text


def test_the_probe_runs_in_a_child_process_and_passes_on_the_cpu():
    probe = dali_loader.probe_roi_decode(None)
    assert probe == (0, "window decode ok"), probe
    assert dali_loader.roi_decode_choice(probe) is True
