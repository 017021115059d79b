"""A synthetic labelled set of ImageNet's size (1,281,167 images, 1,000 classes by default),
written as real JPEGs in tar shards (the YFCC100M layout, read by data/shards.py) or, for small
N, in class folders: what `dcluster demo-data DIR --dataset synthetic` writes, so that the
paths that only matter at scale (the feature pass over 1.28M images, k = 10,000, the monitor,
`dcluster eval`, checkpoints of a 1.28M-image run) can be rehearsed on a CPU, without a
download (benchmarks/rehearse_imagenet.py, docs/scale.md).

Why not noise: NMI, k-NN and the clustering are only worth measuring on images a network can
learn to group. Each class is an oriented sinusoidal grating (one of 20 orientations, one of 5
spatial frequencies) in one of 10 colour pairs, 20 x 5 x 10 = 1,000 combinations, assigned to
the classes by a seeded permutation; each image draws its own phase, a small orientation and
frequency jitter, a contrast, a brightness and pixel noise. Classes therefore differ in
features a small convnet sees at 24 pixels, and survive random-resized crops and flips (a
flip mirrors the orientation, which DeepCluster's augmentation does to every class alike).

Deterministic from the seed: the class of every image comes from one seeded permutation of the
exact class counts (``n // classes`` each, the first ``n % classes`` classes one more), and
the pixels of shard s from the generator (seed, s) alone, so shards are written in parallel,
in any order, and a rerun after an interruption writes the missing ones byte for byte as the
first run would have. Tar headers carry no time or owner, so equal seeds give equal bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np
from PIL import Image

from dcluster.core.atomic import atomic_write, atomic_write_bytes
from dcluster.core.errors import UserError

log = logging.getLogger("dcluster.data")

MANIFEST = "manifest.json"
PROGRESS = ".synthetic-progress.json"  # the shards written so far, until the manifest is
CLASSES_FILE = "classes.txt"  # data/shards.py's CLASSES: class name of class number i on line i
LAYOUTS = ("shards", "folders")
JPEG_QUALITY = 90
ORIENTATIONS, FREQUENCIES, PALETTES = 20, 5, 10
MAX_CLASSES = ORIENTATIONS * FREQUENCIES * PALETTES
NOISE_STD = 0.08  # of the 0..1 pixel range


class SyntheticDataError(ValueError, UserError):
    """Settings that cannot make the set, or a folder that holds something else."""


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything the bytes depend on; recorded in the manifest."""
    n: int = 1_281_167
    classes: int = 1000
    side: int = 24
    seed: int = 0
    layout: str = "shards"
    shard_size: int = 10_000

    def check(self) -> None:
        if not 1 <= self.classes <= MAX_CLASSES:
            raise SyntheticDataError(f"--classes {self.classes}: between 1 and {MAX_CLASSES}")
        if self.n < self.classes:
            raise SyntheticDataError(f"--n {self.n}: at least one image per class "
                                     f"(--classes {self.classes})")
        if self.side < 8:
            raise SyntheticDataError(f"--size {self.side}: at least 8 pixels")
        if self.layout not in LAYOUTS:
            raise SyntheticDataError(f"--layout {self.layout!r}: one of {', '.join(LAYOUTS)}")
        if self.shard_size < 1:
            raise SyntheticDataError(f"--shard-size {self.shard_size}: at least 1")

    @property
    def shards(self) -> int:
        return -(-self.n // self.shard_size)

    def class_name(self, c: int) -> str:
        return f"c{c:04d}"


def class_labels(spec: SyntheticSpec) -> np.ndarray:
    """int16 (n,): the class of every image, the exact counts in a seeded order."""
    counts = np.full(spec.classes, spec.n // spec.classes, dtype=np.int64)
    counts[: spec.n % spec.classes] += 1
    labels = np.repeat(np.arange(spec.classes, dtype=np.int16), counts)
    return np.random.default_rng((spec.seed, 0)).permutation(labels)


def class_looks(spec: SyntheticSpec) -> np.ndarray:
    """float64 (classes, 9): orientation (rad), frequency (cycles per image), then the two
    RGB colours of each class; the 1,000 combinations dealt to the classes by the seed."""
    combos = np.random.default_rng((spec.seed, 1)).permutation(MAX_CLASSES)[: spec.classes]
    orientation = (combos % ORIENTATIONS) * (np.pi / ORIENTATIONS)
    frequency = 1.5 + (combos // ORIENTATIONS % FREQUENCIES) * 1.0
    palettes = np.random.default_rng((spec.seed, 2)).uniform(0.1, 0.9, size=(PALETTES, 2, 3))
    colours = palettes[combos // (ORIENTATIONS * FREQUENCIES)].reshape(spec.classes, 6)
    return np.column_stack([orientation, frequency, colours])


def render(labels: np.ndarray, looks: np.ndarray, side: int,
           rng: np.random.Generator) -> np.ndarray:
    """uint8 (len(labels), side, side, 3): one grating per label, with per-image jitter."""
    m = len(labels)
    look = looks[labels]
    theta = look[:, 0] + rng.normal(0.0, 0.03, m)
    freq = look[:, 1] * rng.uniform(0.92, 1.08, m)
    phase = rng.uniform(0.0, 2 * np.pi, m)
    contrast = rng.uniform(0.6, 1.0, m)
    grid = (np.arange(side) + 0.5) / side
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    along = (np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy)
    wave = 0.5 + 0.5 * contrast[:, None, None] * np.sin(
        2 * np.pi * freq[:, None, None] * along + phase[:, None, None])
    first, second = look[:, None, None, 2:5], look[:, None, None, 5:8]
    pixels = first + (second - first) * wave[..., None]
    pixels = pixels + rng.uniform(-0.1, 0.1, (m, 1, 1, 1))
    pixels = pixels + rng.normal(0.0, NOISE_STD, pixels.shape)
    return np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A member with no time, owner or mode of its own, so equal bytes give equal tars."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def shard_images(spec: SyntheticSpec, shard: int, labels: np.ndarray,
                 looks: np.ndarray) -> list[tuple[int, int, bytes]]:
    """(global index, class, JPEG bytes) of the images of shard ``shard``."""
    lo = shard * spec.shard_size
    mine = labels[lo: lo + spec.shard_size].astype(np.int64)
    pixels = render(mine, looks, spec.side, np.random.default_rng((spec.seed, 3, shard)))
    return [(lo + i, int(c), _jpeg(p)) for i, (c, p) in enumerate(zip(mine, pixels))]


def _shard_name(spec: SyntheticSpec, shard: int) -> str:
    return f"synthetic-{shard:06d}.tar"


def _write_shard(spec: SyntheticSpec, shard: int, out: Path, labels: np.ndarray,
                 looks: np.ndarray) -> str:
    """Write one shard (tar or class folders) whole and atomically; its sha256 (for tars) or
    the sha256 of its images' bytes in order (for folders)."""
    digest = hashlib.sha256()
    images = shard_images(spec, shard, labels, looks)
    if spec.layout == "shards":
        def fill(f: BinaryIO) -> None:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for index, c, data in images:
                    _tar_member(tar, f"{index:08d}.jpg", data)
                    _tar_member(tar, f"{index:08d}.cls", str(c).encode())

        atomic_write(out / _shard_name(spec, shard), fill)
        return hashlib.sha256((out / _shard_name(spec, shard)).read_bytes()).hexdigest()
    for index, c, data in images:
        folder = out / spec.class_name(c)
        folder.mkdir(exist_ok=True)
        atomic_write_bytes(folder / f"{index:08d}.jpg", data)
        digest.update(data)
    return digest.hexdigest()


def _worker(args: tuple[SyntheticSpec, list[int], str]) -> dict[int, str]:
    spec, shards, out = args
    labels, looks = class_labels(spec), class_looks(spec)
    return {s: _write_shard(spec, s, Path(out), labels, looks) for s in shards}


def _check_folder(out: Path, spec: SyntheticSpec) -> dict[str, str]:
    """The shards already written by an interrupted run of the same spec; refuses a folder
    that holds another set or anything else."""
    progress = out / PROGRESS
    manifest = out / MANIFEST
    if manifest.exists():
        found = json.loads(manifest.read_text()).get("spec")
        if found != asdict(spec):
            raise SyntheticDataError(f"{out} holds a synthetic set made with {found}, not "
                                     f"{asdict(spec)}; use another folder")
    elif any(not e.name.startswith(".") for e in out.iterdir()) and not progress.exists():
        first = sorted(e.name for e in out.iterdir() if not e.name.startswith("."))[0]
        raise SyntheticDataError(f"{out} is not empty and not a synthetic set (it holds "
                                 f"{first}); use an empty or new folder")
    if progress.exists():
        saved = json.loads(progress.read_text())
        if saved["spec"] != asdict(spec):
            raise SyntheticDataError(f"{out} holds part of a synthetic set made with "
                                     f"{saved['spec']}, not {asdict(spec)}; use another folder")
        return saved["done"]
    return {}


def make_synthetic_dataset(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec(),
                           workers: Optional[int] = None) -> Path:
    """Write the set ``spec`` describes into ``out_dir`` (created if needed) with ``workers``
    processes (default: the CPUs this process may use); resumes an interrupted write.
    ``manifest.json``, written last, records the spec, the class counts, each shard's sha256,
    the bytes on disk and the seconds it took."""
    spec.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = _check_folder(out, spec)
    if (out / MANIFEST).exists():
        log.info("synthetic set %s: complete already", out)
        return out
    started = time.perf_counter()
    todo = [s for s in range(spec.shards) if str(s) not in done]
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(todo) or 1))
    progress = out / PROGRESS
    atomic_write_bytes(progress, json.dumps({"spec": asdict(spec), "done": done}).encode())
    batches = [todo[i: i + workers] for i in range(0, len(todo), workers)]
    with ProcessPoolExecutor(workers) as pool:
        for number, batch in enumerate(batches, 1):
            for result in pool.map(_worker, [(spec, [s], str(out)) for s in batch]):
                done.update({str(s): sha for s, sha in result.items()})
            atomic_write_bytes(progress, json.dumps({"spec": asdict(spec), "done": done}).encode())
            log.info("synthetic set: %d/%d shards (%.0f s)", len(done), spec.shards,
                     time.perf_counter() - started)
    if spec.layout == "shards":
        atomic_write_bytes(out / CLASSES_FILE,
                           "".join(spec.class_name(c) + "\n" for c in range(spec.classes)).encode())
    counts = np.bincount(class_labels(spec), minlength=spec.classes)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    manifest = {"dataset": "dcluster synthetic gratings", "spec": asdict(spec),
                "images": spec.n, "classes": spec.classes,
                "class_counts": {"min": int(counts.min()), "max": int(counts.max())},
                "bytes": size, "write_seconds": round(time.perf_counter() - started, 1),
                "sha256": [done[str(s)] for s in range(spec.shards)]}
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    progress.unlink(missing_ok=True)
    log.info("synthetic set %s: %d images, %d classes, %.2f GB, written in %.0f s", out, spec.n,
             spec.classes, size / 1e9, manifest["write_seconds"])
    return out
