"""YFCC100M-style tar shards (webdataset layout) as a source of images by global index.

A folder of ``*.tar`` files, each holding samples ``<key>.jpg`` (or .png/.webp/.bmp) with
optional ``<key>.cls`` (class number as text) and ``<key>.json`` (metadata, not read here).
Global index = position of the sample when the shards are taken in name order and their
members in archive order. Reading one image must not mean scanning a tar, so the first open
builds an index of (shard, offset, size, class, member name) and caches it next to the shards
(``index.npy`` rows, memory-mapped, and ``index.json`` with what the rows were built from).

A cached index is only trusted while it still matches the shards: every shard it names must
exist with the byte size it had, no shard may have been added, and the tar header in front of
the first and last sample of each shard must still name that sample. Anything else is an error
naming the file, raised before training: a stale index would hand out the wrong bytes for an
index, and re-indexing silently would renumber the images under a run's saved labels.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from dcluster.core.atomic import atomic_write, atomic_write_bytes
from dcluster.data.source import IMAGE_EXTENSIONS, DataSourceError

log = logging.getLogger("dcluster.data")

INDEX_ROWS = "index.npy"
INDEX_META = "index.json"
CLASSES = "classes.txt"  # optional: class name of class number i on line i
_FORMAT = "dcluster-shard-index/1"
_IMAGE_EXTS = frozenset(ext[1:] for ext in IMAGE_EXTENSIONS)
_TAR_BLOCK = 512


def is_shard_dir(path: str | Path) -> bool:
    root = Path(path)
    return root.is_dir() and any(p.suffix == ".tar" and p.is_file() for p in root.iterdir())


def _split_member(name: str) -> tuple[str, str]:
    """webdataset naming: the key is everything before the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _scan_shard(path: Path, shard: int) -> list[tuple[int, int, int, int, str]]:
    """Rows (shard, offset, size, class or -1, member name) of the images in one shard."""
    file_size = path.stat().st_size
    images: dict[str, tuple[int, int, str]] = {}  # key -> (offset, size, name), archive order
    classes: dict[str, int] = {}
    ignored: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > file_size:
                    raise DataSourceError(f"tar shard {path} is truncated: member {member.name} "
                                          f"ends at byte {member.offset_data + member.size}, "
                                          f"the file has {file_size}")
                key, ext = _split_member(member.name)
                if ext in _IMAGE_EXTS and key not in images:
                    images[key] = (member.offset_data, member.size, member.name)
                elif ext == "cls":
                    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                    try:
                        classes[key] = int(text)
                    except ValueError:
                        raise DataSourceError(f"tar shard {path}: {member.name} holds "
                                              f"{text[:40]!r}, not a class number") from None
                elif ext != "json":
                    ignored.append(member.name)
    except (tarfile.TarError, EOFError) as err:
        raise DataSourceError(f"tar shard {path} cannot be read ({err}): truncated or not a "
                              f"tar file") from None
    if ignored:
        log.warning("tar shard %s: ignoring %d members that are not images, e.g. %s",
                    path, len(ignored), ignored[0])
    return [(shard, offset, size, classes.get(key, -1), name)
            for key, (offset, size, name) in images.items()]


def _fingerprint(shards: list[str], names: np.ndarray) -> str:
    """As FolderSource.fingerprint: a hash of which image each global index names."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(shard.encode() + b"\0")
    digest.update(np.ascontiguousarray(names).tobytes())  # fixed-width names, one call
    return digest.hexdigest()[:16]


def build_index(root: Path) -> tuple[np.ndarray, dict]:
    """Scan every shard of ``root``: the index rows and the metadata that validates them."""
    shards = sorted(p.name for p in root.iterdir() if p.suffix == ".tar" and p.is_file())
    rows = [row for number, name in enumerate(shards) for row in _scan_shard(root / name, number)]
    width = max([len(r[4].encode()) for r in rows], default=1)
    table = np.array([(s, o, n, c, name.encode()) for s, o, n, c, name in rows],
                     dtype=[("shard", "<i4"), ("offset", "<i8"), ("size", "<i8"),
                            ("target", "<i8"), ("name", f"S{width}")])
    meta = {"format": _FORMAT, "samples": len(table),
            "shards": [{"name": name, "bytes": (root / name).stat().st_size} for name in shards],
            "fingerprint": _fingerprint(shards, table["name"])}
    return table, meta


def write_index(root: Path, table: np.ndarray, meta: dict) -> None:
    """Rows first, metadata last: the metadata's presence marks a complete index."""
    atomic_write(root / INDEX_ROWS, lambda f: np.save(f, table))
    atomic_write_bytes(root / INDEX_META, json.dumps(meta, indent=1).encode())


def _check_tar_header(path: Path, header: bytes, name: bytes, size: int) -> bool:
    """Does the tar header block in front of a member's data describe that member? A ustar
    name field holds 100 bytes, so a longer name is compared on its first 100."""
    if len(header) != _TAR_BLOCK:
        return False
    stored = header[:100].split(b"\0", 1)[0]
    try:
        stored_size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return False
    return stored == name[:100] and stored_size == size


class TarShardSource:
    """Images in the tar shards of ``root``, read by global index through the cached index.

    Attributes as FolderSource: ``root``, ``class_names`` and ``targets`` (None unless every
    sample has a ``.cls``), ``shards`` (file names, in index order).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataSourceError(f"shard folder {self.root} does not exist or is not a folder")
        if not (self.root / INDEX_META).exists():
            log.info("tar shards %s: no index yet, scanning the shards once", self.root)
            table, meta = build_index(self.root)
            try:
                write_index(self.root, table, meta)
            except OSError as err:
                log.warning("cannot cache the shard index in %s (%s): it will be rebuilt by "
                            "every run", self.root, err)
        meta, table = self._load_index()
        self._validate(meta, table)
        if len(table) == 0:
            raise DataSourceError(f"tar shards {self.root} hold no images (looked for members "
                                  f"<key>.{{{','.join(sorted(_IMAGE_EXTS))}}})")
        self.shards: list[str] = [s["name"] for s in meta["shards"]]
        self._rows = table
        self._fingerprint: str = meta["fingerprint"]
        self.targets: Optional[np.ndarray] = None
        self.class_names: Optional[list[str]] = None
        labels = np.asarray(table["target"])
        if (labels >= 0).all():
            self.targets = labels.astype(np.int64)
            self.class_names = self._class_names(int(labels.max()) + 1)
        elif (labels >= 0).any():
            log.warning("tar shards %s: only %d of %d samples have a .cls; treating the data "
                        "as unlabelled", self.root, int((labels >= 0).sum()), len(labels))
        self._fds: dict[int, int] = {}
        self._open_lock = threading.Lock()
        log.info("tar shards %s: %d images in %d shards, %s", self.root, len(self), len(self.shards),
                 f"{len(self.class_names)} classes" if self.class_names else "no classes")

    def _load_index(self) -> tuple[dict, np.ndarray]:
        meta_path, rows_path = self.root / INDEX_META, self.root / INDEX_ROWS
        try:
            meta = json.loads(meta_path.read_text())
            table = np.load(rows_path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataSourceError(f"shard index {meta_path} / {rows_path} cannot be read ({err}); "
                                  f"delete both to rebuild it") from None
        if meta.get("format") != _FORMAT or meta.get("samples") != len(table):
            raise DataSourceError(f"shard index {rows_path} does not match {meta_path} "
                                  f"(format {meta.get('format')!r}, {meta.get('samples')} samples "
                                  f"listed, {len(table)} rows); delete both to rebuild it")
        return meta, table

    def _validate(self, meta: dict, table: np.ndarray) -> None:
        rebuild = (f"re-run prepare-shards, or delete {self.root / INDEX_META} and "
                   f"{self.root / INDEX_ROWS} to re-index (this renumbers the images)")
        listed = {s["name"] for s in meta["shards"]}
        extra = sorted(p.name for p in self.root.iterdir()
                       if p.suffix == ".tar" and p.name not in listed)
        if extra:
            raise DataSourceError(f"tar shard {self.root / extra[0]} is not in the index "
                                  f"{self.root / INDEX_META}: {rebuild}")
        shard_column = np.asarray(table["shard"])
        for number, shard in enumerate(meta["shards"]):
            path = self.root / shard["name"]
            if not path.is_file():
                raise DataSourceError(f"tar shard {path} listed in the index is missing")
            size = path.stat().st_size
            if size != shard["bytes"]:
                state = "truncated" if size < shard["bytes"] else "changed"
                raise DataSourceError(f"tar shard {path} is {size} bytes, the index was built "
                                      f"when it had {shard['bytes']} ({state}): {rebuild}")
            first, end = np.searchsorted(shard_column, [number, number + 1])  # rows by shard
            if first == end:
                continue
            with open(path, "rb") as f:
                for row in (table[first], table[end - 1]):
                    f.seek(int(row["offset"]) - _TAR_BLOCK)
                    if not _check_tar_header(path, f.read(_TAR_BLOCK), bytes(row["name"]),
                                             int(row["size"])):
                        raise DataSourceError(
                            f"tar shard {path} does not match the index: no member "
                            f"{bytes(row['name']).decode()} of {int(row['size'])} bytes at "
                            f"byte {int(row['offset'])}: {rebuild}")

    def _class_names(self, count: int) -> list[str]:
        path = self.root / CLASSES
        if not path.exists():
            return [str(c) for c in range(count)]
        names = path.read_text(encoding="utf-8").splitlines()
        if len(names) < count:
            raise DataSourceError(f"{path} names {len(names)} classes but the shards use class "
                                  f"numbers up to {count - 1}")
        return names

    def __len__(self) -> int:
        return len(self._rows)

    def describe(self, index: int) -> str:
        row = self._rows[index]
        return f"{self.root / self.shards[row['shard']]}:{bytes(row['name']).decode()}"

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._open_lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = os.open(self.root / self.shards[shard], os.O_RDONLY)
                    self._fds[shard] = fd
        return fd

    def read_bytes(self, index: int) -> bytes:
        """One pread on a descriptor kept open per shard: no seek state, so loader threads
        can share it, and no re-open per image (which costs more than the read on NFS)."""
        row = self._rows[index]
        size = int(row["size"])
        data = os.pread(self._fd(int(row["shard"])), size, int(row["offset"]))
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes (shard truncated?)")
        return data

    def fingerprint(self) -> str:
        return self._fingerprint

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self) -> dict:
        # Worker processes (torchvision loader) open their own descriptors.
        state = self.__dict__.copy()
        state["_fds"], state["_open_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open_lock = threading.Lock()
