"""ImageNet's validation set as it ships: one flat folder of images and a ground-truth file
(the devkit's, with its meta.mat, or Kaggle's CSV), read through eval.val_path and
eval.val_labels, gives the same k-NN score as the same images in class folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from dcluster.core.config import ConfigError
from dcluster.evaluation.protocols import evaluate
from dcluster.methods import METHODS, Config
from helpers import CONFIGS, TINY_MMDC

VAL_PER_CLASS = 10


@pytest.fixture(scope="module")
def val_sets(demo_digits, tmp_path_factory) -> dict[str, Path]:
    """The same 100 digits (not among digits_subset's first 40 of each class) as class folders,
    and flat as ILSVRC2012_val_NNNNNNNN.JPEG in a shuffled order, with a CSV and a devkit
    ground truth whose ILSVRC2012_IDs are numbered otherwise than the classes."""
    root = tmp_path_factory.mktemp("val")
    tree, flat = root / "tree", root / "flat"
    flat.mkdir()
    images = [(class_dir.name, image) for class_dir in sorted(demo_digits.iterdir())
              if class_dir.is_dir()
              for image in sorted(class_dir.iterdir())[40:40 + VAL_PER_CLASS]]
    order = np.random.default_rng(0).permutation(len(images))
    classes = sorted({name for name, _ in images})
    id_of = {name: int(i) for name, i in zip(classes, np.random.default_rng(1).permutation(
        len(classes)) + 1)}
    rows, ids = [], []
    for number, index in enumerate(order, 1):
        name, image = images[index]
        (tree / name).mkdir(parents=True, exist_ok=True)
        (tree / name / image.name).write_bytes(image.read_bytes())
        flat_name = f"ILSVRC2012_val_{number:08d}"
        (flat / f"{flat_name}.JPEG").write_bytes(image.read_bytes())
        rows.append(f"{flat_name},{name} 1 2 30 31")
        ids.append(str(id_of[name]))
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))
    devkit = root / "devkit" / "data"
    devkit.mkdir(parents=True)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(ids) + "\n")
    synsets = np.zeros((len(classes), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    for i, name in enumerate(classes):
        synsets[i, 0] = (id_of[name], name)
    scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    return {"tree": tree, "flat": flat, "csv": root / "LOC_val_solution.csv",
            "devkit": devkit / "ILSVRC2012_validation_ground_truth.txt"}


def knn_top1(digits: Path, runs: Path, *overrides: str) -> float:
    result, _ = evaluate("knn", CONFIGS / "demo.yaml", METHODS, Config, [
        f"data.path={digits}", f"runs_root={runs}", "tracking.enabled=false",
        "eval.batch_size=64", *TINY_MMDC, *overrides])
    return result.metrics["top1"]


def test_a_flat_folder_with_either_ground_truth_scores_as_the_class_folders(
        digits_subset, val_sets, tmp_path):
    folders = knn_top1(digits_subset, tmp_path, f"eval.val_path={val_sets['tree']}")
    for form in ("csv", "devkit"):
        flat = knn_top1(digits_subset, tmp_path, f"eval.val_path={val_sets['flat']}",
                        f"eval.val_labels={val_sets[form]}")
        assert flat == folders, form
    assert 0.1 < folders < 1.0  # a real score of the random-init network, not a constant


def test_a_ground_truth_that_misses_an_image_or_a_class_is_refused_naming_it(
        digits_subset, val_sets, tmp_path):
    short = tmp_path / "short.csv"
    short.write_text("\n".join(val_sets["csv"].read_text().splitlines()[:-1]))
    with pytest.raises(ConfigError, match="'eval.val_labels'.*no class for image"):
        knn_top1(digits_subset, tmp_path, f"eval.val_path={val_sets['flat']}",
                 f"eval.val_labels={short}")
    other = tmp_path / "other.csv"
    other.write_text(val_sets["csv"].read_text().replace(",3 1 2", ",n0000 1 2"))
    with pytest.raises(ConfigError, match="class 'n0000'.*not a class folder"):
        knn_top1(digits_subset, tmp_path, f"eval.val_path={val_sets['flat']}",
                 f"eval.val_labels={other}")
    with pytest.raises(ConfigError, match="'eval.val_labels'.*set it too"):
        knn_top1(digits_subset, tmp_path, f"eval.val_labels={val_sets['csv']}")
