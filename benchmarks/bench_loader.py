"""Images per second of the DALI (CPU) and torchvision loaders on the same photographs.

Real camera JPEGs at ImageNet-like sizes (about 500x375, portrait and landscape, cut from
scikit-learn's two sample photos), the same augmentations (random resized crop to 224 + flip,
or resize 256 + centre crop 224), the same batch size and the same order.

Threads: DALI decodes in ``--workers`` threads and reads the bytes in as many more (the
loader's own reader threads: reads wait on storage); torchvision reads and decodes in
``--workers`` worker processes. The whole benchmark, worker processes included, is confined
to ``--workers`` CPU cores (``sched_setaffinity``), so both loaders have the same cores; the
JSON records each side's threads and the cores. torchvision's side is one DataLoader per pass
kind with persistent workers, iterated for every pass (DALI's pipelines are likewise built
once and reused); the product's loader, which builds a new DataLoader (and starts its workers)
every pass, is timed beside it as ``torchvision_per_pass``. Each side gets one untimed warm-up
pass; then the sides take turns, ``--repeats`` rounds, and the best pass of each counts. The
last line of output is one JSON object.

    python benchmarks/bench_loader.py [--images 512] [--workers 2] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from dcluster.core.config import DataConfig
from dcluster.data import FolderSource
from dcluster.data.torchvision_loader import TorchvisionPipelines
from dcluster.data.dali_loader import DaliPipelines

# (width, height): ImageNet's most common shapes.
SIZES = [(500, 375), (375, 500), (500, 333), (400, 400), (500, 400)]


def write_photos(root: Path, count: int) -> None:
    """``count`` JPEGs (quality 90) in 10 class folders, each a distinct crop of a photo,
    resampled to one of SIZES."""
    write_photos_range(root, 0, count)


def write_photos_range(root: Path, first: int, end: int) -> None:
    """Photos number ``first`` to ``end - 1`` of write_photos (a part for one process)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # 427 x 640 x 3 each
    for n in range(first, end):
        source = photos[n % len(photos)]
        width, height = SIZES[n % len(SIZES)]
        side_h, side_w = 300 + (n * 7) % 120, 300 + (n * 13) % 300
        top = (n * 37) % (source.shape[0] - side_h + 1)
        left = (n * 53) % (source.shape[1] - side_w + 1)
        image = Image.fromarray(source[top:top + side_h, left:left + side_w])
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        path = root / f"class{n % 10}" / f"{n:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        path.write_bytes(buffer.getvalue())


def best_rates(passes: dict[str, Callable[[], Iterable]], repeats: int) -> dict[str, float]:
    """Images per second of each pass, the best of ``repeats`` rounds in which every pass runs
    once in turn, after one untimed warm-up of each; counts the images delivered."""
    def run(make_pass: Callable[[], Iterable]) -> float:
        start = time.perf_counter()
        delivered = sum(len(batch.indices) for batch in make_pass())
        return delivered / (time.perf_counter() - start)

    for make_pass in passes.values():
        run(make_pass)
    best = dict.fromkeys(passes, 0.0)
    for _ in range(repeats):
        for name, make_pass in passes.items():
            best[name] = max(best[name], run(make_pass))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2,
                        help="DALI decode threads = torchvision worker processes = CPU cores")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cores = sorted(os.sched_getaffinity(0))[:args.workers]
    os.sched_setaffinity(0, cores)  # threads and worker processes started from now inherit it

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        root = Path(tmp)
        write_photos(root, args.images)
        source = FolderSource(root)
        cfg = DataConfig(path=str(root), workers=args.workers, crop_size=224, resize_size=256,
                         min_scale=0.08, decode_device="cpu")
        dali = DaliPipelines(source, cfg, seed=0)
        torchvision = TorchvisionPipelines(source, cfg, seed=0)
        # A training order as the balanced sampler makes it: shuffled, with repeats.
        order = np.random.default_rng(0).integers(0, len(source), size=len(source))
        indices = np.arange(len(source))
        persistent = {
            "train": torchvision.data_loader(order, 0, torchvision.train_transform(0),
                                             args.batch_size, persistent_workers=True),
            "feature": torchvision.data_loader(indices, 0, torchvision.feature_transform(),
                                               args.batch_size, persistent_workers=True)}
        rates = best_rates({
            "dali_train": lambda: dali.train_batches(order, 0, args.batch_size),
            "torchvision_train": lambda: persistent["train"],
            "torchvision_per_pass_train": lambda: torchvision.train_batches(
                order, 0, args.batch_size),
            "dali_feature": lambda: dali.feature_batches(indices, args.batch_size),
            "torchvision_feature": lambda: persistent["feature"],
            "torchvision_per_pass_feature": lambda: torchvision.feature_batches(
                indices, args.batch_size),
        }, args.repeats)
        persistent.clear()  # their workers end before the folder they read goes
    for name, rate in rates.items():
        print(f"{name:30s} {rate:8.1f} img/s", flush=True)
    result: dict[str, float | int | str | list[int]] = {
        "images": len(source), "sizes": "~500x375", "batch_size": args.batch_size,
        "repeats": args.repeats, "cores": cores, "dali_decode_threads": dali.threads,
        "dali_reader_threads": dali.threads, "torchvision_workers": args.workers,
        "torchvision_persistent_workers": args.workers > 0,  # none without worker processes
        **{f"{name}_img_s": round(rate, 1) for name, rate in rates.items()}}
    for kind in ("train", "feature"):
        result[f"dali_over_torchvision_{kind}"] = round(
            rates[f"dali_{kind}"] / rates[f"torchvision_{kind}"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
