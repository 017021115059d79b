"""The synthetic ImageNet-sized set (`dcluster demo-data --dataset synthetic`): byte-identical
for a seed, exact class counts, read back by both sources with the labels it was written with,
resumable after an interruption, and classes a k-NN on pixels can tell apart."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from dcluster.cli import main
from dcluster.data import FolderSource, TarShardSource, decode_rgb
from dcluster.data.synthetic import (MANIFEST, PROGRESS, SyntheticDataError, SyntheticSpec,
                                     class_labels, make_synthetic_dataset)

SPEC = SyntheticSpec(n=2503, classes=50, side=24, seed=3, shard_size=600)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, "index.npy", "index.json")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "s", SPEC, workers=2)


def test_class_counts_are_exact_and_the_order_seeded():
    labels = class_labels(SyntheticSpec(n=1_281_167, classes=1000))
    counts = np.bincount(labels, minlength=1000)
    assert counts[:167].tolist() == [1282] * 167 and counts[167:].tolist() == [1281] * 833
    assert not np.array_equal(labels, np.sort(labels))  # classes mixed across shards
    np.testing.assert_array_equal(labels, class_labels(SyntheticSpec(n=1_281_167, classes=1000)))


def test_the_same_seed_writes_the_same_bytes_and_another_seed_others(shards, tmp_path):
    again = make_synthetic_dataset(tmp_path / "again", SPEC, workers=1)
    assert digest(again) == digest(shards)
    other = make_synthetic_dataset(tmp_path / "other", SyntheticSpec(**{**SPEC.__dict__, "seed": 4}))
    assert digest(other)["synthetic-000000.tar"] != digest(shards)["synthetic-000000.tar"]


def test_tar_shards_read_back_with_their_labels(shards):
    source = TarShardSource(shards)
    assert len(source) == SPEC.n and source.class_names[:2] == ["c0000", "c0001"]
    np.testing.assert_array_equal(source.targets, class_labels(SPEC))
    assert np.asarray(decode_rgb(source.read_bytes(2502), 2502, "")).shape == (24, 24, 3)
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["class_counts"] == {"min": 50, "max": 51} and len(manifest["sha256"]) == 5


def test_class_folders_for_small_n(tmp_path):
    spec = SyntheticSpec(n=300, classes=10, layout="folders", shard_size=100)
    source = FolderSource(make_synthetic_dataset(tmp_path / "f", spec))
    assert len(source) == 300 and source.class_names == [f"c{c:04d}" for c in range(10)]
    assert np.bincount(source.targets).tolist() == [30] * 10


def test_an_interrupted_write_completes_to_the_same_bytes(shards, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("synthetic-000001.tar", "synthetic-000003.tar"):  # two shards were done
        (partial / name).write_bytes((shards / name).read_bytes())
    (partial / PROGRESS).write_text(json.dumps({"spec": SPEC.__dict__, "done": {
        "1": digest(shards)["synthetic-000001.tar"], "3": digest(shards)["synthetic-000003.tar"]}}))
    make_synthetic_dataset(partial, SPEC)
    assert digest(partial) == digest(shards)


def test_a_folder_of_something_else_or_another_spec_is_refused(shards, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(SyntheticDataError, match="not a synthetic set"):
        make_synthetic_dataset(tmp_path / "photos", SPEC)
    with pytest.raises(SyntheticDataError, match="made with"):
        make_synthetic_dataset(shards, SyntheticSpec(**{**SPEC.__dict__, "seed": 9}))
    with pytest.raises(SyntheticDataError, match="--classes 1001"):
        make_synthetic_dataset(tmp_path / "x", SyntheticSpec(classes=1001))


def test_classes_are_separable_in_pixels(shards):
    """A 1-NN on the decoded pixels finds the class far above chance (1 in 50): the set has
    structure for a network to learn, not noise."""
    source = TarShardSource(shards)
    pixels = np.stack([np.asarray(decode_rgb(source.read_bytes(i), i, ""), np.float32).ravel()
                       for i in range(len(source))])
    pixels -= pixels.mean(axis=1, keepdims=True)
    pixels /= np.linalg.norm(pixels, axis=1, keepdims=True)
    train, test = pixels[:2000], pixels[2000:]
    nearest = (test @ train.T).argmax(axis=1)
    accuracy = (source.targets[:2000][nearest] == source.targets[2000:]).mean()
    assert accuracy > 0.3


def test_the_cli_writes_the_set_and_names_a_bad_setting(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "c"), "--dataset", "synthetic", "--n", "120",
                 "--classes", "12", "--layout", "folders"]) == 0
    assert len(FolderSource(tmp_path / "c")) == 120
    assert main(["demo-data", str(tmp_path / "d"), "--dataset", "synthetic", "--n", "5",
                 "--classes", "12"]) == 2
    assert "--n 5: at least one image per class" in capsys.readouterr().err
