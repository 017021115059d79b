"""Which labelled images an evaluation trains on and which it scores on.

Either two folder trees (data.path for training, eval.val_path for validation, with the same
class folders; or eval.val_path flat, as ImageNet ships it, labelled by eval.val_labels), or
one tree split per class with a seed, so that every protocol and every rerun holds out the
same images.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcluster.core.config import Config, ConfigError
from dcluster.data import ImageSource, Pipelines, build_pipelines, open_source
from dcluster.data.ground_truth import label_flat_folder
from dcluster.data.source import DataSourceError, FolderSource
from dcluster.core.seeding import derived_rng


@dataclass
class Split:
    """Global indices of one side of an evaluation, with the source and loader they index."""
    source: ImageSource
    pipelines: Pipelines
    indices: np.ndarray  # int64

    @property
    def labels(self) -> np.ndarray:
        assert self.source.targets is not None
        return self.source.targets[self.indices]


def stratified_split(targets: np.ndarray, val_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) global indices, sorted: of each class, round(val_fraction * n) images
    (at least one, and at least one left for training when the class has two) go to val."""
    rng = derived_rng(seed, 0, "eval_split")
    train, val = [], []
    for c in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == c))
        n_val = min(max(1, round(val_fraction * len(members))), max(len(members) - 1, 1))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def labelled_source(cfg: Config, key: str, path: str) -> ImageSource:
    source = open_source(dataclasses.replace(cfg.data, path=path))
    if source.targets is None:
        raise ConfigError(f"config key '{key}' = {path!r}: evaluation needs labels, i.e. class "
                          "folders (root/<class>/<image>), and this folder has none")
    return source


def flat_with_ground_truth(cfg: Config, class_names: list[str]) -> ImageSource:
    """eval.val_path as ImageNet ships it (one flat folder), labelled by eval.val_labels."""
    try:
        return label_flat_folder(FolderSource(cfg.eval.val_path), Path(cfg.eval.val_labels),
                                 class_names)
    except DataSourceError as err:
        raise ConfigError(f"config key 'eval.val_labels' = {cfg.eval.val_labels!r}: "
                          f"{err}") from None


def open_splits(cfg: Config) -> tuple[Split, Split]:
    """(train, val) for cfg.eval.val_path and cfg.data.path; errors before any image is read."""
    train_source = labelled_source(cfg, "data.path", cfg.data.path)
    train_pipes = build_pipelines(train_source, cfg.data, cfg.seed)
    if not cfg.eval.val_path:
        train_idx, val_idx = stratified_split(train_source.targets, cfg.eval.val_fraction,
                                              cfg.seed)
        return (Split(train_source, train_pipes, train_idx),
                Split(train_source, train_pipes, val_idx))
    if cfg.eval.val_labels:
        val_source = flat_with_ground_truth(cfg, train_source.class_names)
    else:
        val_source = labelled_source(cfg, "eval.val_path", cfg.eval.val_path)
    if val_source.class_names != train_source.class_names:
        raise ConfigError(
            f"config key 'eval.val_path' = {cfg.eval.val_path!r}: its class folders "
            f"({', '.join(val_source.class_names[:5])}...) differ from those of data.path "
            f"{cfg.data.path!r} ({', '.join(train_source.class_names[:5])}...)")
    val_pipes = build_pipelines(val_source, cfg.data, cfg.seed)
    return (Split(train_source, train_pipes, np.arange(len(train_source), dtype=np.int64)),
            Split(val_source, val_pipes, np.arange(len(val_source), dtype=np.int64)))


def all_labelled(cfg: Config) -> Split:
    """Every image of data.path (which must have classes)."""
    source = labelled_source(cfg, "data.path", cfg.data.path)
    return Split(source, build_pipelines(source, cfg.data, cfg.seed),
                 np.arange(len(source), dtype=np.int64))
