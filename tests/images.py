"""Real photographs and deliberately broken files for data tests, made on the fly.

The crops come from scikit-learn's two bundled photos, so tests decode genuine camera JPEGs
(with real texture for the crops to differ on) without any download; sizes vary so that the
resize and crop paths see portrait, landscape and square inputs.
"""
from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

# (height, width) of the crops, cycled through: small, so the tests stay fast.
CROP_SIZES = [(48, 64), (64, 40), (50, 50), (36, 72), (70, 45)]


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images
    return tuple(load_sample_images().images)  # china.jpg, flower.jpg: 427 x 640 x 3


def photo(number: int) -> Image.Image:
    """A distinct RGB crop for every ``number``."""
    photos = _photos()
    source = photos[number % len(photos)]
    h, w = CROP_SIZES[number % len(CROP_SIZES)]
    # Away from the borders, which are mostly sky and would give near-blank crops.
    top = 120 + (number * 37) % (source.shape[0] - 240 - h)
    left = 120 + (number * 53) % (source.shape[1] - 240 - w)
    return Image.fromarray(np.ascontiguousarray(source[top:top + h, left:left + w]))


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_photo(path: Path, number: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(photo(number)))
    return path


def write_photo_tree(root: Path, per_class: dict[str, int]) -> Path:
    """``root/<class>/<n>.jpg`` with the given number of photos per class."""
    number = 0
    for name, count in per_class.items():
        for n in range(count):
            write_photo(root / name / f"{n:03d}.jpg", number)
            number += 1
    return root


def write_zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_truncated_jpeg(path: Path, number: int = 0) -> Path:
    data = jpeg_bytes(photo(number))
    path.write_bytes(data[: len(data) // 2])
    return path


def write_text_as_jpg(path: Path) -> Path:
    path.write_text("this is not an image\n")
    return path


def write_png(path: Path, mode: str, number: int = 0) -> Path:
    """A PNG in ``mode`` (RGBA, P, L, ...), converted from a photo crop."""
    photo(number).convert(mode).save(path, format="PNG")
    return path


def write_cmyk_jpeg(path: Path, number: int = 0) -> Path:
    photo(number).convert("CMYK").save(path, format="JPEG", quality=90)
    return path


def write_grayscale_jpeg(path: Path, number: int = 0) -> Path:
    photo(number).convert("L").save(path, format="JPEG", quality=90)
    return path
