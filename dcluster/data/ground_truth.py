"""Labels for a flat folder of images from the ground-truth file it ships with: ImageNet's
validation set comes as 50,000 images in one folder, not in class folders, with its classes in
the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (+ ``meta.mat``) or, from Kaggle, in
``LOC_val_solution.csv``. Reading those as shipped spares every user a reshuffling script whose
mistakes would silently corrupt every validation score.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from dcluster.data.source import DataSourceError, FolderSource

DEVKIT_META = "meta.mat"  # beside the devkit's ground-truth file: ILSVRC2012_ID -> WNID


def _stem(name: str) -> str:
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _csv_labels(path: Path) -> dict[str, str]:
    """{image id: class} of a CSV whose header row is followed by rows of image id (a file name
    with or without extension) and class, or Kaggle's PredictionString ("n01751748 x y x y
    ..."), whose first word is the class."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or any(len(row) < 2 for row in rows[1:]):
        raise DataSourceError(f"ground-truth file {path}: expected a header row, then rows of "
                              "image id and class (e.g. Kaggle's LOC_val_solution.csv)")
    return {_stem(row[0]): row[1].split()[0] for row in rows[1:]}


def _devkit_labels(path: Path, names: Sequence[str]) -> dict[str, str]:
    """{image id: WNID} from the devkit's ground truth: line i holds the ILSVRC2012_ID of the
    i-th image in file-name order; the devkit's meta.mat beside it maps IDs to WNIDs."""
    meta = path.parent / DEVKIT_META
    if not meta.is_file():
        raise DataSourceError(f"ground-truth file {path}: the devkit's {DEVKIT_META}, which "
                              f"names the class of each ILSVRC2012_ID, is not beside it ({meta})")
    from scipy.io import loadmat

    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(lines) != len(names):
        raise DataSourceError(f"ground-truth file {path}: {len(lines)} labels for the "
                              f"{len(names)} images of the folder (one line per image, in "
                              "file-name order)")
    try:
        return {_stem(name): wnid_of[int(line)] for name, line in zip(sorted(names), lines)}
    except (KeyError, ValueError) as err:
        raise DataSourceError(f"ground-truth file {path}: {err} is not an ILSVRC2012_ID of "
                              f"{meta}") from None


def label_flat_folder(source: FolderSource, ground_truth: Path,
                      class_names: list[str]) -> FolderSource:
    """``source`` (a flat folder) with the classes of ``ground_truth`` as its targets, numbered
    as ``class_names`` (the training tree's class folders), so that a label means the same
    class on both sides."""
    if source.class_names is not None:
        raise DataSourceError(f"image folder {source.root} has class folders: it needs no "
                              f"ground-truth file ({ground_truth})")
    labels = (_csv_labels(ground_truth) if ground_truth.suffix.lower() == ".csv"
              else _devkit_labels(ground_truth, source.relpaths))
    number = {name: i for i, name in enumerate(class_names)}
    targets = []
    for relpath in source.relpaths:
        label = labels.get(_stem(relpath))
        if label is None:
            raise DataSourceError(f"ground-truth file {ground_truth}: no class for image "
                                  f"{source.root / relpath}")
        if label not in number:
            raise DataSourceError(f"ground-truth file {ground_truth}: class {label!r} of "
                                  f"{relpath} is not a class folder of the training images")
        targets.append(number[label])
    source.class_names = list(class_names)
    source.targets = np.asarray(targets, dtype=np.int64)
    return source
