"""Pictures of what the clusters hold: a contact sheet of sample images from the largest, the
smallest and some random clusters, one row each, captioned with the cluster's size and, where
the images have classes, its majority class and purity.

Why: a clustering method is judged by looking at its clusters (DeepCluster's own figures are
such grids); NMI says how much, not what. A giant cluster of blank images, or clusters that
split one class by background, show at a glance here and nowhere in the curves.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from dcluster.core.atomic import atomic_write
from dcluster.data import ImageSource

CAPTION = 14  # pixels of the caption strip above each row


@dataclass(frozen=True)
class Row:
    """One cluster's row: why it was chosen, its id, size, sampled images and caption."""
    kind: str  # "largest", "smallest" or "random"
    cluster: int
    size: int
    images: np.ndarray  # global indices drawn from the cluster
    caption: str


def choose_rows(labels: np.ndarray, clusters_each: int, per_cluster: int, seed: int,
                targets: Optional[np.ndarray] = None,
                class_names: Optional[Sequence[str]] = None) -> list[Row]:
    """The largest, the smallest and random non-empty clusters, ``clusters_each`` of each kind
    and none twice (fewer rows when there are fewer clusters), each with up to ``per_cluster``
    of its images drawn with ``seed``; unreadable images (label -1) belong to none."""
    rng = np.random.default_rng(seed)
    sizes = np.bincount(labels[labels >= 0])
    nonempty = np.flatnonzero(sizes)
    by_size = nonempty[np.argsort(-sizes[nonempty], kind="stable")]
    chosen: list[tuple[str, int]] = []
    for kind, candidates in (("largest", by_size), ("smallest", by_size[::-1]),
                             ("random", rng.permutation(nonempty))):
        fresh = [int(c) for c in candidates if int(c) not in {c for _, c in chosen}]
        chosen += [(kind, c) for c in fresh[:clusters_each]]
    rows = []
    for kind, cluster in chosen:
        members = np.flatnonzero(labels == cluster)
        drawn = np.sort(rng.choice(members, min(per_cluster, len(members)), replace=False))
        caption = f"{kind} #{cluster}: {len(members)} images"
        if targets is not None:
            counts = np.bincount(targets[members])
            majority = int(counts.argmax())
            name = class_names[majority] if class_names else str(majority)
            caption += f", majority {name} ({counts[majority] / len(members):.0%} pure)"
        rows.append(Row(kind, cluster, len(members), drawn, caption))
    return rows


def _tile(source: ImageSource, index: int, side: int) -> Image.Image:
    with Image.open(io.BytesIO(source.read_bytes(index))) as image:
        return ImageOps.fit(image.convert("RGB"), (side, side))


def draw_sheet(source: ImageSource, rows: list[Row], per_cluster: int, path: Path,
               tile: int = 64) -> Path:
    """The PNG of ``rows``: per_cluster tiles of ``tile`` pixels a row, a caption above each
    (a cluster smaller than per_cluster leaves its row's end blank); written atomically."""
    sheet = Image.new("RGB", (per_cluster * tile, len(rows) * (tile + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        top = r * (tile + CAPTION)
        draw.text((2, top + 1), row.caption, fill="black")
        for c, index in enumerate(row.images):
            sheet.paste(_tile(source, int(index), tile), (c * tile, top + CAPTION))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))
    return path


def contact_sheet(source: ImageSource, labels: np.ndarray, path: Path, seed: int,
                  clusters_each: int = 4, per_cluster: int = 8) -> Path:
    """Choose the rows (captioned with classes where ``source`` has them) and draw them."""
    rows = choose_rows(labels, clusters_each, per_cluster, seed, source.targets,
                       source.class_names)
    return draw_sheet(source, rows, per_cluster, path)


def sheet_of_run(run_dir: Path, schema: type, epoch: Optional[int] = None,
                 out: Optional[Path] = None) -> Path:
    """`dcluster show clusters RUN`: the contact sheet of the run's clusters after ``epoch``
    (from 1; default the newest saved), from its assignments/ files and its config's images,
    written to ``out`` or <run>/plots/clusters_eNNNNNN.png. ``schema``: what the run's
    config.yaml is read with (dcluster.methods.Config, handed down by the cli)."""
    from dcluster.core.config import load_config
    from dcluster.core.errors import UserError
    from dcluster.core.rundir import RunDir
    from dcluster.data import open_source

    run = RunDir(Path(run_dir))
    if not run.config_path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    saved = sorted(run.assignments.glob("epoch_*.npy"))
    if epoch is not None:
        saved = [path for path in saved if path.name == f"epoch_{epoch:06d}.npy"]
    if not saved:
        raise UserError(f"{run.assignments}: no cluster assignments"
                        + (f" of epoch {epoch}" if epoch is not None else "")
                        + " (written at the end of each epoch)")
    cfg = load_config(run.config_path, schema=schema)
    number = int(saved[-1].stem.split("_")[1])
    return contact_sheet(open_source(cfg.data), np.load(saved[-1]),
                         Path(out) if out else sheet_path(run.plots, number), cfg.seed)


def sheet_path(plots: Path, epoch: int) -> Path:
    """Where a run keeps the contact sheet of the clusters after ``epoch`` (from 1)."""
    return plots / f"clusters_e{epoch:06d}.png"
