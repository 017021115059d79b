"""The demo dataset: scikit-learn's bundled handwritten digits as a folder of real JPEGs.

It needs no download, yet goes through exactly the path a real dataset takes (folder scan,
JPEG decode, crops), and its ten classes let the demo score the clusters. Every file is
written atomically (a hidden temporary name, then a rename), so an interrupted run leaves only
whole images and re-running completes it; ``manifest.json``, written last, marks a finished
dataset.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from dcluster.atomic import atomic_write_bytes

log = logging.getLogger("dcluster.data")

MANIFEST = "manifest.json"
_DIGITS = 10
_JPEG_QUALITY = 95


def _encode(pixels: np.ndarray, size: int) -> bytes:
    """8x8 digit with values 0..16 to a ``size``-pixel greyscale JPEG."""
    grey = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)
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
            raise ValueError(f"{out} holds a demo dataset made with {found}, not {manifest}; "
                             f"use another folder")
        return
    expected = {str(d) for d in range(_DIGITS)}
    strangers = sorted(e.name for e in out.iterdir()
                       if e.name not in expected and not e.name.startswith("."))
    if strangers:
        raise ValueError(f"{out} is not empty and not a demo dataset (it holds {strangers[0]}); "
                         f"use an empty or new folder")


def make_demo_dataset(out_dir: str | Path, size: int = 32) -> Path:
    """Write the 1797 digits as ``out_dir/<digit>/<sklearn index:04d>.jpg``; return out_dir."""
    from sklearn.datasets import load_digits  # slow import, needed only here

    out = Path(out_dir)
    digits = load_digits()
    manifest = {"dataset": "sklearn.datasets.load_digits", "images": len(digits.target),
                "classes": _DIGITS, "size": size, "format": f"JPEG greyscale q{_JPEG_QUALITY}"}
    out.mkdir(parents=True, exist_ok=True)
    _check_is_demo_dir(out, manifest)
    written = 0
    for number, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        path = out / str(label) / f"{number:04d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, _encode(pixels, size))
        written += 1
    if not (out / MANIFEST).exists():
        atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    log.info("demo dataset %s: %d images, %d written now", out, len(digits.target), written)
    return out
