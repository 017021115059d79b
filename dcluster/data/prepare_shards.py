"""``dcluster prepare-shards SRC OUT``: write tar shards (webdataset layout) from a folder tree
or a text file of image paths, verifying every image on the way.

Output in OUT:
  ``shard-000000.tar`` ...   samples ``<key>.<ext>`` (the original bytes, ext from the
                              detected format), ``<key>.cls`` (class number, when the input
                              has classes), ``<key>.json`` ({"path", "class"}: provenance)
  ``classes.txt``            class names, line i = class number i (labelled inputs only)
  ``rejects.tsv``            input path <TAB> reason, for every image that did not decode
  ``manifest.json``          what was asked for and which shards are complete
  ``index.json``/``index.npy`` the random-access index (shards.py), written last

Shard j holds the inputs j*shard_size .. (j+1)*shard_size-1 that decode, and the key of an
image is its input position, so the shards are a pure function of the input list: a run that
is interrupted (each shard is written under a temporary name and renamed when complete; the
manifest lists the complete ones) is continued by running the same command again, which
redoes only the incomplete shard and yields the same files as a run that was never stopped.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from dcluster.core.atomic import atomic_write, atomic_write_bytes, remove_stale_temps
from dcluster.data.badfiles import Unreadable, load_or_unreadable
from dcluster.data.decode import BadImageError, decode_rgb
from dcluster.data.shards import CLASSES, build_index, write_index
from dcluster.data.source import DataSourceError, FolderSource, ImageSource

log = logging.getLogger("dcluster.data")

MANIFEST = "manifest.json"
REJECTS = "rejects.tsv"
_FORMAT = "dcluster-shards/1"
# Formats kept as they are; the extension is what the shard reader and the decoders expect.
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


class PathListSource:
    """Images named one per line in a text file: ``path`` or ``path<TAB>class name``.

    Relative paths are taken from the list file's folder; blank lines and lines starting with
    ``#`` are skipped. Classes are kept only if every line has one.
    """

    def __init__(self, list_file: str | Path) -> None:
        self.list_file = Path(list_file)
        entries = []
        for number, line in enumerate(self.list_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            path, _, name = line.rstrip("\r\n").partition("\t")
            entries.append((self.list_file.parent / path.strip(), name.strip() or None))
        if not entries:
            raise DataSourceError(f"image list {self.list_file} names no images")
        self.paths = [path for path, _ in entries]
        self.class_names: Optional[list[str]] = None
        self.targets: Optional[np.ndarray] = None
        if all(name is not None for _, name in entries):
            self.class_names = sorted({name for _, name in entries})
            number_of = {name: i for i, name in enumerate(self.class_names)}
            self.targets = np.array([number_of[name] for _, name in entries], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def read_bytes(self, index: int) -> bytes:
        return self.paths[index].read_bytes()

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path in self.paths:
            digest.update(str(path).encode("utf-8", "surrogateescape") + b"\0")
        return digest.hexdigest()[:16]


def open_input(src: str | Path) -> ImageSource:
    path = Path(src)
    if path.is_dir():
        return FolderSource(path)
    if path.is_file():
        return PathListSource(path)
    raise DataSourceError(f"prepare-shards input {path} is neither a folder nor a list file")


@dataclass(frozen=True)
class _Verified:
    data: bytes
    ext: str


def _verified(data: bytes, index: int, path: str) -> _Verified:
    """The bytes as they are, once a full decode (the torchvision loader's) succeeded."""
    decode_rgb(data, index, path)
    with Image.open(io.BytesIO(data)) as image:
        image_format = image.format
    if image_format not in _EXTENSIONS:
        raise BadImageError(index, path, f"format {image_format} is not one of "
                                         f"{', '.join(sorted(_EXTENSIONS))}")
    return _Verified(data, _EXTENSIONS[image_format])


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same input gives byte-identical shards, whenever and wherever run.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


@dataclass
class PrepareResult:
    shards: int
    images: int
    rejected: int
    written_now: int  # shards written by this call (the others were complete already)


class _Plan:
    """What a run of prepare-shards is asked to do, and the manifest that records progress."""

    def __init__(self, source: ImageSource, out: Path, shard_size: int) -> None:
        self.source, self.out, self.shard_size = source, out, shard_size
        self.count = -(-len(source) // shard_size)
        self.key_width = max(9, len(str(len(source) - 1)))
        digest = hashlib.sha256(json.dumps([shard_size, source.class_names]).encode())
        for index in range(len(source)):
            digest.update(source.describe(index).encode("utf-8", "surrogateescape") + b"\0")
        self.header = {"format": _FORMAT, "inputs": len(source), "shard_size": shard_size,
                       "input_digest": digest.hexdigest()[:16]}
        self.done: dict[str, dict] = self._load_manifest()

    def _load_manifest(self) -> dict[str, dict]:
        """The complete shards so far; a new folder gets its manifest before any shard, so
        that a shard on disk always belongs to a manifest."""
        path = self.out / MANIFEST
        if not path.exists():
            strangers = sorted(p.name for p in self.out.iterdir() if not p.name.startswith("."))
            if strangers:
                raise DataSourceError(f"{self.out} is not empty and holds no {MANIFEST} (it "
                                      f"holds {strangers[0]}); use an empty or new folder")
            self._save({})
            return {}
        manifest = json.loads(path.read_text())
        if {k: manifest.get(k) for k in self.header} != self.header:
            raise DataSourceError(f"{self.out} holds shards prepared from other inputs or "
                                  f"another --shard-size ({path}); use a new folder")
        return manifest["shards"]

    def _save(self, shards: dict[str, dict]) -> None:
        atomic_write_bytes(self.out / MANIFEST,
                           json.dumps({**self.header, "shards": shards}, indent=1).encode())

    def shard_name(self, number: int) -> str:
        return f"shard-{number:06d}.tar"

    def positions(self, number: int) -> range:
        return range(number * self.shard_size,
                     min((number + 1) * self.shard_size, len(self.source)))

    def is_done(self, number: int) -> bool:
        name = self.shard_name(number)
        record = self.done.get(name)
        path = self.out / name
        return record is not None and path.is_file() and path.stat().st_size == record["bytes"]

    def record(self, number: int, images: int, rejects: list[Unreadable]) -> None:
        name = self.shard_name(number)
        self.done[name] = {"images": images, "bytes": (self.out / name).stat().st_size,
                           "rejects": [[bad.path, bad.reason] for bad in rejects]}
        self._save(self.done)


def _write_shard(plan: _Plan, number: int, readers: ThreadPoolExecutor,
                 bar: Optional[tqdm]) -> None:
    source, positions = plan.source, plan.positions(number)
    rejects: list[Unreadable] = []

    def fill(f: BinaryIO) -> None:
        results = readers.map(lambda i: load_or_unreadable(source, i, _verified), positions)
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for position, result in zip(positions, results):
                if isinstance(result, Unreadable):
                    rejects.append(result)
                else:
                    key = f"{position:0{plan.key_width}d}"
                    _add(tar, f"{key}.{result.ext}", result.data)
                    meta: dict[str, Union[str, int]] = {"path": source.describe(position)}
                    if source.targets is not None:
                        target = int(source.targets[position])
                        _add(tar, f"{key}.cls", str(target).encode())
                        meta["class"] = source.class_names[target]
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
                if bar is not None:
                    bar.update()

    atomic_write(plan.out / plan.shard_name(number), fill)
    plan.record(number, len(positions) - len(rejects), rejects)
    for bad in rejects:
        log.warning("rejected %s: %s", bad.path, bad.reason)


def prepare_shards(src: str | Path, out: str | Path, shard_size: int, workers: int = 0,
                   progress: str = "auto") -> PrepareResult:
    """Write (or complete) the shards of ``src`` in ``out``; see the module docstring.

    ``workers`` threads decode for verification (0: one per CPU); ``progress`` is auto (a bar
    on a terminal, a log line per shard otherwise), always or never.
    """
    if shard_size <= 0:
        raise ValueError(f"shard size must be positive, got {shard_size}")
    source = open_input(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # of a shard or manifest whose writer was killed
    plan = _Plan(source, out, shard_size)
    todo = [n for n in range(plan.count) if not plan.is_done(n)]
    log.info("prepare-shards %s -> %s: %d images in %d shards, %d to write", src, out,
             len(source), plan.count, len(todo))
    show_bar = progress == "always" or (progress == "auto" and sys.stderr.isatty())
    remaining = sum(len(plan.positions(n)) for n in todo)
    bar = tqdm(total=len(source), initial=len(source) - remaining, desc="prepare-shards",
               unit="img", dynamic_ncols=True) if show_bar else None
    readers = ThreadPoolExecutor(workers or os.cpu_count() or 1)
    try:
        for done, number in enumerate(todo, 1):
            _write_shard(plan, number, readers, bar)
            if bar is None and progress != "never":
                log.info("prepare-shards: %s complete (%d/%d to write)",
                         plan.shard_name(number), done, len(todo))
    finally:
        readers.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    return _finish(plan, len(todo))


def _finish(plan: _Plan, written_now: int) -> PrepareResult:
    """Classes, the rejects report and the index: rewritten from the manifest each time, so a
    run interrupted while writing them is completed by the next."""
    if plan.source.class_names is not None:
        atomic_write_bytes(plan.out / CLASSES,
                           "".join(f"{n}\n" for n in plan.source.class_names).encode())
    rejects = [row for n in range(plan.count) for row in plan.done[plan.shard_name(n)]["rejects"]]
    atomic_write_bytes(plan.out / REJECTS,
                       "".join(f"{path}\t{reason}\n" for path, reason in rejects).encode())
    table, meta = build_index(plan.out)
    write_index(plan.out, table, meta)
    images = sum(record["images"] for record in plan.done.values())
    log.info("prepare-shards: %d shards, %d images, %d rejected (listed in %s)", plan.count,
             images, len(rejects), plan.out / REJECTS)
    return PrepareResult(plan.count, images, len(rejects), written_now)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``prepare-shards`` on the CLI's sub-command parsers."""
    p = subparsers.add_parser("prepare-shards", help="write tar shards (webdataset layout) "
                              "from an image folder tree or a list of image paths")
    p.add_argument("src", help="image folder tree (class folders or flat), or a text file "
                               "with one image path per line (optionally <TAB>class)")
    p.add_argument("out", help="output folder; re-run the same command to continue")
    p.add_argument("--shard-size", type=_positive, default=1000,
                   help="input images per shard (default 1000)")
    p.add_argument("--workers", type=int, default=0,
                   help="threads verifying images (default 0: one per CPU)")
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto")
    p.set_defaults(func=cmd_prepare_shards)


def cmd_prepare_shards(args: argparse.Namespace) -> int:
    result = prepare_shards(args.src, args.out, args.shard_size, args.workers, args.progress)
    print(f"shards: {args.out} ({result.shards} shards, {result.images} images, "
          f"{result.rejected} rejected: see {Path(args.out) / REJECTS})")
    return 0
