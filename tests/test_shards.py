"""Tar shards: prepare-shards (round trip, rejects, interruption), the shard source and its
index (random access, validation against the shard files), and loading from shards."""
import argparse
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dcluster.core.config import DataConfig
from dcluster.data import DataSourceError, FolderSource, TarShardSource, open_source
from dcluster.data import prepare_shards as prep
from dcluster.data.prepare_shards import MANIFEST, REJECTS, PathListSource, prepare_shards
from dcluster.data.shards import INDEX_META, INDEX_ROWS
from images import (jpeg_bytes, photo, write_cmyk_jpeg, write_grayscale_jpeg, write_photo,
                    write_photo_tree, write_png, write_text_as_jpg, write_truncated_jpeg,
                    write_zero_byte)

SHARD_SIZE = 4


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A class tree with the cases prepare-shards must keep and the ones it must reject."""
    root = write_photo_tree(tmp_path_factory.mktemp("src"), {"cat": 5, "dog": 4})
    write_cmyk_jpeg(root / "cat" / "cmyk.jpg", 11)
    write_grayscale_jpeg(root / "dog" / "gray.jpg", 12)
    write_png(root / "dog" / "palette.png", "P", 13)
    write_zero_byte(root / "cat" / "empty.jpg")
    write_truncated_jpeg(root / "dog" / "cut.jpg", 14)
    write_text_as_jpg(root / "dog" / "text.jpg")
    return root


REJECTED = {"cat/empty.jpg": "empty", "dog/cut.jpg": "truncated", "dog/text.jpg": "cannot identify"}


@pytest.fixture(scope="module")
def shards(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    prepare_shards(src, out, SHARD_SIZE, workers=2, progress="never")
    return out


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_round_trip_gives_back_every_accepted_image_byte_for_byte(src, shards):
    folder, source = FolderSource(src), TarShardSource(shards)
    kept = [i for i, rel in enumerate(folder.relpaths) if rel not in REJECTED]
    assert len(source) == len(kept) == 12
    for index, original in enumerate(kept):
        assert source.read_bytes(index) == folder.read_bytes(original)
    assert source.class_names == folder.class_names == ["cat", "dog"]
    assert source.targets.tolist() == folder.targets[kept].tolist()
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"shard-00000{n}.tar" for n in range(4)]
    # The key is the input position; the .json names the input file.
    member = source.describe(0).rsplit(":", 1)[1]
    assert member == "000000000.jpg" and str(shards / "shard-000000.tar") in source.describe(0)
    with tarfile.open(shards / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert meta == {"path": folder.describe(0), "class": "cat"}


def test_rejects_are_reported_with_reasons_and_kept_formats_get_their_extension(src, shards):
    lines = (shards / REJECTS).read_text().splitlines()
    reasons = dict(line.split("\t") for line in lines)
    assert sorted(reasons) == sorted(str(src / rel) for rel in REJECTED)
    for rel, word in REJECTED.items():
        assert word in reasons[str(src / rel)].lower()
    names = [n for tar in shards.glob("*.tar") for n in tarfile.open(tar).getnames()]
    assert sum(n.endswith(".png") for n in names) == 1 and sum(n.endswith(".jpg") for n in names) == 11


def test_rerun_on_complete_shards_rewrites_no_shard(src, shards):
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")}
    result = prepare_shards(src, shards, SHARD_SIZE, progress="never")
    assert result.written_now == 0 and result.images == 12 and result.rejected == 3
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")} == before


def test_interrupted_prepare_resumes_to_the_same_shards(src, shards, tmp_path, monkeypatch):
    calls = {"n": 0}
    verified = prep._verified

    def failing_after_six(data, index, path):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt  # as a user pressing Ctrl-C in the second shard
        return verified(data, index, path)

    out = tmp_path / "out"
    monkeypatch.setattr(prep, "_verified", failing_after_six)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(src, out, SHARD_SIZE, workers=1, progress="never")
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]
    assert list(json.loads((out / MANIFEST).read_text())["shards"]) == ["shard-000000.tar"]

    monkeypatch.setattr(prep, "_verified", verified)
    result = prepare_shards(src, out, SHARD_SIZE, workers=2, progress="never")
    assert result.written_now == 3
    assert shard_files(out) == shard_files(shards)
    assert (out / REJECTS).read_text() == (shards / REJECTS).read_text()
    assert TarShardSource(out).fingerprint() == TarShardSource(shards).fingerprint()
    assert not list(out.glob(".*"))  # no temporary file left behind


def test_prepare_refuses_a_folder_made_from_other_inputs(src, shards, tmp_path):
    with pytest.raises(DataSourceError, match="other inputs or another --shard-size"):
        prepare_shards(src, shards, SHARD_SIZE + 1, progress="never")
    (tmp_path / "stuff.txt").write_text("x")
    with pytest.raises(DataSourceError, match="not empty"):
        prepare_shards(src, tmp_path, SHARD_SIZE, progress="never")


def test_prepare_from_a_list_file_with_relative_paths_and_classes(tmp_path):
    for n in range(3):
        write_photo(tmp_path / "imgs" / f"{n}.jpg", n)
    (tmp_path / "list.txt").write_text("# images\nimgs/2.jpg\tb\nimgs/0.jpg\ta\n\nimgs/1.jpg\tb\n")
    result = prepare_shards(tmp_path / "list.txt", tmp_path / "out", 2, progress="never")
    source = TarShardSource(tmp_path / "out")
    assert result.images == 3 and source.class_names == ["a", "b"]
    assert source.targets.tolist() == [1, 0, 1]
    assert [source.read_bytes(i) for i in range(3)] == [
        (tmp_path / "imgs" / f"{n}.jpg").read_bytes() for n in (2, 0, 1)]
    assert PathListSource(tmp_path / "list.txt").describe(0) == str(tmp_path / "imgs" / "2.jpg")


def test_cli_helper_registers_and_runs_prepare_shards(src, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    prep.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare-shards", str(src), str(tmp_path / "o"), "--shard-size",
                              "100", "--progress", "never"])
    assert args.func(args) == 0
    assert "1 shards, 12 images, 3 rejected" in capsys.readouterr().out


def test_open_source_detects_shards_and_honours_the_key(shards, src):
    assert isinstance(open_source(DataConfig(path=str(shards))), TarShardSource)
    assert isinstance(open_source(DataConfig(path=str(src))), FolderSource)
    assert isinstance(open_source(DataConfig(path=str(shards), source="shards")), TarShardSource)
    with pytest.raises(DataSourceError, match="holds no images"):
        open_source(DataConfig(path=str(shards), source="folder"))


def copy_of(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    out.mkdir()
    for p in shards.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


def test_missing_shard_is_an_error_naming_it(shards, tmp_path):
    out = copy_of(shards, tmp_path)
    (out / "shard-000001.tar").unlink()
    with pytest.raises(DataSourceError, match=r"shard-000001.tar listed in the index is missing"):
        TarShardSource(out)


def test_truncated_shard_is_an_error_naming_it(shards, tmp_path):
    out = copy_of(shards, tmp_path)
    data = (out / "shard-000002.tar").read_bytes()
    (out / "shard-000002.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataSourceError, match=r"shard-000002.tar is \d+ bytes.*\(truncated\)"):
        TarShardSource(out)
    # Without an index, the scan finds the cut member.
    (out / INDEX_META).unlink()
    with pytest.raises(DataSourceError, match=r"shard-000002.tar is truncated"):
        TarShardSource(out)


def test_index_not_matching_its_shard_is_an_error_naming_it(shards, tmp_path):
    out = copy_of(shards, tmp_path)
    # Same size, other content: the members of shard 1 in the opposite order.
    with tarfile.open(out / "shard-000001.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(out / "shard-000001.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in reversed(members):
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(DataSourceError, match=r"shard-000001.tar does not match the index"):
        TarShardSource(out)


def test_shard_added_after_indexing_is_an_error_naming_it(shards, tmp_path):
    out = copy_of(shards, tmp_path)
    (out / "shard-000009.tar").write_bytes((out / "shard-000000.tar").read_bytes())
    with pytest.raises(DataSourceError, match=r"shard-000009.tar is not in the index"):
        TarShardSource(out)


def write_foreign_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_foreign_webdataset_shards_are_indexed_once_and_cached(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dcluster.data")
    write_foreign_shard(tmp_path / "b.tar", [("x/k3.jpg", jpeg_bytes(photo(3))), ("x/k3.cls", b"1")])
    write_foreign_shard(tmp_path / "a.tar", [
        ("k1.jpg", jpeg_bytes(photo(1))), ("k1.cls", b"0"), ("k1.json", b"{}"),
        ("README.txt", b"not an image"),
        ("k2.jpg", b"not a jpeg at all"), ("k2.cls", b"1")])
    source = TarShardSource(tmp_path)
    assert source.shards == ["a.tar", "b.tar"] and len(source) == 3
    assert source.describe(2) == f"{tmp_path / 'b.tar'}:x/k3.jpg"
    assert source.read_bytes(0) == jpeg_bytes(photo(1)) and source.read_bytes(1) == b"not a jpeg at all"
    assert source.targets.tolist() == [0, 1, 1] and source.class_names == ["0", "1"]
    assert "README.txt" in caplog.text
    assert (tmp_path / INDEX_ROWS).exists() and (tmp_path / INDEX_META).exists()
    again = TarShardSource(tmp_path)
    assert again.fingerprint() == source.fingerprint() and len(again) == 3


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_loaders_skip_a_non_image_inside_a_shard_and_read_the_rest(tmp_path, loader):
    write_foreign_shard(tmp_path / "a.tar", [
        ("k0.jpg", jpeg_bytes(photo(0))), ("k1.jpg", b"not a jpeg at all"),
        ("k2.jpg", jpeg_bytes(photo(2)))])
    from dcluster.data import build_pipelines
    cfg = DataConfig(path=str(tmp_path), loader=loader, crop_size=16, resize_size=20,
                     workers=1, max_bad_fraction=0.5)
    pipes = build_pipelines(open_source(cfg), cfg, 0)
    batches = list(pipes.feature_batches([0, 1, 2], 2))
    assert [b.indices.tolist() for b in batches] == [[0], [2]]
    assert list(pipes.bad_indices) == [1]
    assert f"{tmp_path / 'a.tar'}:k1.jpg" in pipes.bad_indices[1]
    assert "cannot identify" in pipes.bad_indices[1]


def test_dali_reads_shards_like_the_folder_they_came_from(src, shards):
    from dcluster.data.dali_loader import DaliPipelines
    cfg = DataConfig(path=str(shards), crop_size=16, resize_size=20, workers=2)
    folder, source = FolderSource(src), TarShardSource(shards)
    kept = [i for i, rel in enumerate(folder.relpaths) if rel not in REJECTED]
    from_shards = list(DaliPipelines(source, cfg, 0).feature_batches(range(12), 5))
    from_folder = list(DaliPipelines(folder, cfg, 0).feature_batches(kept, 5))
    assert all(np.array_equal(a.images, b.images) for a, b in zip(from_shards, from_folder))
