"""Where image bytes live: a folder tree scanned once into a sorted list of files, or tar
shards (``shards.py``, built on this module); ``dcluster.data.open_source`` picks one.

The position of a file in that sorted list is its global index, the only name later stages
use for an image. Sorting by relative path makes the index independent of the file system's
listing order, so every rank, every restart and every loader agrees on which image is which.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from dcluster.core.errors import UserError

log = logging.getLogger("dcluster.data")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


class DataSourceError(ValueError, UserError):
    """The image folder cannot serve as a data source (empty, missing, ambiguous layout)."""


class ImageSource(Protocol):
    """What loaders and training need of a source: encoded bytes by global index, a name for
    each image to put in error messages, and the classes when the source has them."""

    class_names: Optional[list[str]]
    targets: Optional[np.ndarray]  # int64 class number per global index, or None

    def __len__(self) -> int: ...

    def describe(self, index: int) -> str: ...

    def read_bytes(self, index: int) -> bytes: ...

    def fingerprint(self) -> str: ...


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_under(directory: str, prefix: str) -> list[str]:
    """Relative paths (with '/' separators) of the images anywhere below ``directory``.

    Nested folders inside a class folder are followed, as torchvision's ImageFolder does, so a
    class split into sub-folders keeps all its images; hidden folders are skipped.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, directory)
        base = prefix if rel == "." else f"{prefix}{rel.replace(os.sep, '/')}/"
        found.extend(base + name for name in filenames if _is_image(name))
    return found


class FolderSource:
    """Images of ``root/<class>/<image>`` (labelled) or of a flat ``root/<image>`` (unlabelled).

    Attributes: ``root``, ``relpaths`` (sorted; position = global index), ``class_names``
    (sorted class folder names, or None for a flat folder) and ``targets`` (class number per
    global index, int64, or None). Class folders without any image are not classes.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataSourceError(f"image folder {self.root} does not exist or is not a folder")
        flat: list[str] = []
        by_class: dict[str, list[str]] = {}
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    images = _images_under(entry.path, entry.name + "/")
                    if images:
                        by_class[entry.name] = images
                    else:
                        log.warning("ignoring folder %s: it holds no images", entry.path)
                elif entry.is_file() and _is_image(entry.name):
                    flat.append(entry.name)
        if flat and by_class:
            raise DataSourceError(
                f"image folder {self.root} mixes images at its top level (e.g. {sorted(flat)[0]}) "
                f"with class folders (e.g. {sorted(by_class)[0]}/): use either class folders "
                f"only (labelled) or images only (unlabelled)"
            )
        if not flat and not by_class:
            raise DataSourceError(
                f"image folder {self.root} holds no images (looked for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}, in the folder or in class folders)"
            )
        self.class_names: Optional[list[str]] = sorted(by_class) if by_class else None
        self.targets: Optional[np.ndarray]
        if self.class_names is None:
            self.relpaths = sorted(flat)
            self.targets = None
        else:
            class_of = {name: number for number, name in enumerate(self.class_names)}
            labelled = sorted((path, class_of[name]) for name, paths in by_class.items()
                              for path in paths)
            self.relpaths = [path for path, _ in labelled]
            self.targets = np.fromiter((c for _, c in labelled), dtype=np.int64,
                                       count=len(labelled))
        log.info("image folder %s: %d images, %s", self.root, len(self.relpaths),
                 f"{len(self.class_names)} classes" if self.class_names else "no classes")

    def __len__(self) -> int:
        return len(self.relpaths)

    def describe(self, index: int) -> str:
        return str(self.root / self.relpaths[index])

    def read_bytes(self, index: int) -> bytes:
        with open(self.root / self.relpaths[index], "rb") as f:
            return f.read()

    def fingerprint(self) -> str:
        """Hash of the file list: a checkpoint stores it so that resuming on a folder whose
        files changed (and whose global indices therefore mean other images) is caught."""
        digest = hashlib.sha256()
        for path in self.relpaths:
            digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
        return digest.hexdigest()[:16]
