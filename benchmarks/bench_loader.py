"""Images per second of the DALI (CPU) and torchvision loaders on the same photographs.

Real camera JPEGs at ImageNet-like sizes (about 500x375, portrait and landscape, cut from
scikit-learn's two sample photos), the same number of DALI threads as torchvision worker
processes, the same augmentations (random resized crop to 224 + flip, or resize 256 + centre
crop 224), the same batch size and the same order. Each loader gets one untimed warm-up pass,
then the best of ``--repeats`` timed passes counts. The last line of output is one JSON object.

    python benchmarks/bench_loader.py [--images 512] [--workers 2] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

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


def images_per_second(make_pass: Callable[[], Iterator], repeats: int) -> float:
    """Best of ``repeats`` timed passes after one warm-up; counts the images delivered."""
    def run() -> tuple[int, float]:
        start = time.perf_counter()
        delivered = sum(len(batch.indices) for batch in make_pass())
        return delivered, time.perf_counter() - start

    run()
    return max(n / seconds for n, seconds in (run() for _ in range(repeats)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2,
                        help="DALI threads = torchvision worker processes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        root = Path(tmp)
        write_photos(root, args.images)
        source = FolderSource(root)
        cfg = DataConfig(path=str(root), workers=args.workers, crop_size=224, resize_size=256,
                         min_scale=0.08, decode_device="cpu")
        loaders = {"dali": DaliPipelines(source, cfg, seed=0),
                   "torchvision": TorchvisionPipelines(source, cfg, seed=0)}
        # A training order as the balanced sampler makes it: shuffled, with repeats.
        order = np.random.default_rng(0).integers(0, len(source), size=len(source))
        labels = np.zeros(len(source), dtype=np.int64)
        indices = list(range(len(source)))
        result: dict[str, float | int | str] = {
            "images": len(source), "sizes": "~500x375", "workers": args.workers,
            "batch_size": args.batch_size}
        for name, pipes in loaders.items():
            result[f"{name}_train_img_s"] = round(images_per_second(
                lambda: pipes.train_batches(order, labels, 0, args.batch_size), args.repeats), 1)
            result[f"{name}_feature_img_s"] = round(images_per_second(
                lambda: pipes.feature_batches(indices, args.batch_size), args.repeats), 1)
            print(f"{name:12s} train {result[f'{name}_train_img_s']:8.1f} img/s   "
                  f"feature {result[f'{name}_feature_img_s']:8.1f} img/s", flush=True)
    for kind in ("train", "feature"):
        result[f"dali_over_torchvision_{kind}"] = round(
            result[f"dali_{kind}_img_s"] / result[f"torchvision_{kind}_img_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
