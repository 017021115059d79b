"""Encoded bytes to an RGB image, or a BadImageError that says which file and why.

Large crawled datasets hold a few files that are truncated, mislabelled or not images at all;
turning every failure into one exception type lets the loader skip and count them instead of
losing a worker (and the run) to whatever a decoder happens to raise.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


class BadImageError(Exception):
    """An image that cannot be read or decoded; ``index`` is its global index."""

    def __init__(self, index: int, path: str, reason: str) -> None:
        super().__init__(f"{path} (index {index}): {reason}")
        self.index = index
        self.path = path
        self.reason = reason


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # 16-bit greyscale (some PNGs): Pillow's own conversion clips at 255, which would turn
        # the image white, so keep the 8 most significant bits instead.
        high_bits = (np.asarray(image, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(high_bits)
    return image.convert("RGB")


def decode_rgb(data: bytes, index: int, path: str) -> Image.Image:
    """Decode fully (a lazy decode would defer a truncation error to the first crop)."""
    if not data:
        raise BadImageError(index, path, "empty file")
    try:
        image = Image.open(io.BytesIO(data))  # no context manager: closing drops the pixels
        image.load()
        return _to_rgb(image)
    except Exception as err:  # decoders raise many types on bad input (OSError, SyntaxError, ...)
        raise BadImageError(index, path, f"{type(err).__name__}: {err}") from err
