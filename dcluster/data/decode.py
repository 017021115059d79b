"""Encoded bytes to an RGB image, or a BadImageError that says which file and why.

Large crawled datasets hold a few files that are truncated, mislabelled or not images at all;
turning every failure into one exception type lets the loader skip and count them instead of
losing a worker (and the run) to whatever a decoder happens to raise.

``peek_size`` is the cheap check for loaders that decode elsewhere (DALI): it reads only the
header, which also gives the size the crop parameters are drawn for.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImageError(Exception):
    """An image that cannot be read or decoded; ``index`` is its global index."""

    def __init__(self, index: int, path: str, reason: str) -> None:
        super().__init__(f"{path} (index {index}): {reason}")
        self.index = index
        self.path = path
        self.reason = reason


def _reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        # Pillow's own message names the in-memory buffer by its address: noise in a report.
        return "UnidentifiedImageError: cannot identify image file (not an image, or a format " \
               "Pillow does not read)"
    return f"{type(err).__name__}: {err}"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # 16-bit greyscale (some PNGs): Pillow's own conversion clips at 255, which would turn
        # the image white, so keep the 8 most significant bits instead.
        high_bits = (np.asarray(image, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(high_bits)
    return image.convert("RGB")


_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_JPEG_SOS = 0xDA
# Markers without a length field: TEM and the restart markers.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset of the first entropy-coded scan of a JPEG, or None if the markers before it are
    malformed. Walking the marker segments costs a few dozen byte reads, not a decode."""
    i = len(_JPEG_SOI)
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_STANDALONE:
            i += 2
        else:
            end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
            if marker == _JPEG_SOS:
                return end
            i = end
    return None


def peek_size(data: bytes, index: int, path: str) -> tuple[int, int]:
    """(height, width) from the header, rejecting what is certainly not a whole image: empty
    files, unknown formats, and JPEGs with no end-of-image marker after their scan data.

    Entropy-coded data never holds the byte pair FF D9 (an FF there is always followed by 00
    or a restart marker), so a JPEG cut anywhere inside its scans has no EOI after the scan
    start; searching from there also ignores the EOI of an embedded EXIF thumbnail. Damage
    this cannot see (a broken Huffman table, say) is left to the decoder's own error.
    """
    if not data:
        raise BadImageError(index, path, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image_format = image.format
    except Exception as err:  # as in decode_rgb: many exception types on bad input
        raise BadImageError(index, path, _reason(err)) from err
    if image_format == "JPEG":
        scan = _jpeg_scan_start(data)
        if scan is None or data.find(_JPEG_EOI, scan) < 0:
            raise BadImageError(index, path, "truncated JPEG: no end-of-image marker after "
                                             "the scan data")
    return height, width


def decode_rgb(data: bytes, index: int, path: str) -> Image.Image:
    """Decode fully (a lazy decode would defer a truncation error to the first crop)."""
    if not data:
        raise BadImageError(index, path, "empty file")
    try:
        image = Image.open(io.BytesIO(data))  # no context manager: closing drops the pixels
        image.load()
        return _to_rgb(image)
    except Exception as err:  # decoders raise many types on bad input (OSError, SyntaxError, ...)
        raise BadImageError(index, path, _reason(err)) from err
