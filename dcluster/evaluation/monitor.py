"""The online monitor: every ``monitor.every`` epochs (and after the last), the measures of
`dcluster eval knn` and `dcluster eval clusters` on the network as it stands, so that a long
run tells whether its features still improve, and which epoch is the best (the checkpoint
kept by checkpoint.keep_best).

The true labels are read here only, never by training: the weighted k-NN takes the train
split as its memory and scores the held-out split (eval.val_path, or eval.val_fraction of each
class, the same split as `dcluster eval`); the class k-means probe clusters every image of
data.path, or a seeded sample of monitor.max_images of them on a very large set (the held-out
images among them scored, the others the memory). Both use the evaluation's own functions, features and seeds, so an epoch's
monitor values are those that `dcluster eval` reports for that epoch's checkpoint. They go
into the epoch's metrics (keys ``monitor_*``): its line, MLflow and the run's history, which a
checkpoint carries, so a resumed run keeps them exactly.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
from torch import nn

from dcluster.parallel.collectives import Comm
from dcluster.core.config import MONITOR_METRICS, Config, check_key
from dcluster.data import ImageSource, Pipelines
from dcluster.parallel.distributed import Env
from dcluster.evaluation.clusters import kmeans_scores
from dcluster.evaluation.features import shard_features
from dcluster.evaluation.knn import knn_accuracy
from dcluster.evaluation.splits import Split, open_splits, stratified_split
from dcluster.core.metric_spec import Metric, declared
from dcluster.models import DeepClusterNet
from dcluster.core.seeding import derived_rng, derived_seed

log = logging.getLogger("dcluster.evaluation.monitor")

def monitored(cfg: Config, epoch_number: int, epochs: int) -> bool:
    """Whether epoch ``epoch_number`` (counted from 1) is measured."""
    every = cfg.monitor.every
    return every > 0 and (epoch_number % every == 0 or epoch_number == epochs)


class Monitor:
    """The held-out split and the measurement; built once per run on every rank. Each rank
    computes and keeps the features of its own share of the images, and the scores come from
    the sharded k-NN and k-means (knn.py, clusters.py): no rank holds the N x D features."""

    def __init__(self, cfg: Config, source: ImageSource, pipelines: Pipelines) -> None:
        check_key(source.targets is not None, "monitor.every", cfg.monitor.every,
                  f"the monitor needs labels, i.e. class folders in data.path {cfg.data.path!r}")
        self.cfg = cfg
        if cfg.eval.val_path:
            train, self.val = open_splits(cfg)
            self.images = subsample(train, cfg.monitor.max_images, cfg.seed)
            self.held_out = np.zeros(0, dtype=np.int64)  # none of data.path's images
        else:  # the training loaders serve both sides: one feature pass over data.path
            assert source.targets is not None
            _, held_out = stratified_split(source.targets, cfg.eval.val_fraction, cfg.seed)
            every = Split(source, pipelines, np.arange(len(source), dtype=np.int64))
            self.images = subsample(every, cfg.monitor.max_images, cfg.seed)
            self.held_out = np.intersect1d(held_out, self.images.indices, assume_unique=True)
            self.val = Split(source, pipelines, self.held_out)
        n_train = len(self.images.indices) - len(self.held_out)
        check_key(cfg.eval.knn.k <= n_train, "eval.knn.k", cfg.eval.knn.k,
                  f"more neighbours than images in the monitor's train split ({n_train})")
        log.info("monitor: every %d epoch(s), k-NN (k=%d) of %d held-out images against %d, "
                 "k-means probe on %d", cfg.monitor.every, cfg.eval.knn.k, len(self.val.indices),
                 n_train, len(self.images.indices))

    def measure(self, model: nn.Module, epoch_number: int, env: Env,
                comm: Comm) -> dict[str, float]:
        """The ``monitor_*`` values of the network after epoch ``epoch_number`` (from 1), the
        same on every rank."""
        backbone = model.backbone if hasattr(model, "backbone") else model
        assert isinstance(backbone, DeepClusterNet)
        cfg = self.cfg
        features, labels, indices = self._rows(model, backbone, self.images, env)
        if self.val.source is self.images.source:
            held = np.isin(indices, self.held_out, assume_unique=True)
            bank, bank_labels = features[~held], labels[~held]
            queries, query_labels = features[held], labels[held]
        else:
            bank, bank_labels = features, labels
            queries, query_labels, _ = self._rows(model, backbone, self.val, env)
        knn = knn_accuracy(bank, bank_labels, queries, query_labels, cfg.eval.knn.k,
                           cfg.eval.knn.temperature, len(self.images.source.class_names), comm,
                           env.device, cfg.progress)
        # the seed of `dcluster eval clusters` on this epoch's checkpoint
        kmeans = kmeans_scores(features, labels,
                               derived_seed(cfg.seed, epoch_number, "eval_kmeans"), comm,
                               env.device, cfg.clustering.niter, cfg.clustering.device,
                               cfg.clustering.backend)
        values = (knn["top1"], knn["top5"], kmeans["nmi"], kmeans["acc"])
        return dict(zip(MONITOR_METRICS, values))

    def _rows(self, model: nn.Module, backbone: DeepClusterNet, split: Split,
              env: Env) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's (features, classes, global indices) of its share of ``split``."""
        cfg = self.cfg
        features, indices = shard_features(model, split, cfg.eval.batch_size, env, cfg.progress,
                                           compute=backbone.clustering_features)
        return features, split.source.targets[indices], indices


def subsample(split: Split, max_images: int, seed: int) -> Split:
    """``split`` itself, or (``max_images`` > 0 and fewer than its images) a seeded draw of
    ``max_images`` of its images, sorted: the monitor's cost bounded on a very large set."""
    if not 0 < max_images < len(split.indices):
        return split
    drawn = derived_rng(seed, 0, "monitor_sample").choice(split.indices, max_images,
                                                          replace=False)
    return Split(split.source, split.pipelines, np.sort(drawn))


# what the monitor measures, declared: each ranks epochs, higher is better
DECLARED = tuple(Metric(name, higher_is_better=True) for name in MONITOR_METRICS)


def is_best_epoch(cfg: Config, history: list[dict[str, float]], epoch_number: int,
                  metrics: Sequence[Metric] = DECLARED) -> bool:
    """Whether the epoch just ended, ``epoch_number``, is the best so far by
    checkpoint.keep_best (False when no metric is named), which way is better as ``metrics``
    declare it."""
    name = cfg.checkpoint.keep_best
    metric = declared(metrics, name) if name else None
    if metric is None or metric.higher_is_better is None:
        return False
    return best_epoch(history, name, metric.higher_is_better) == epoch_number


def best_epoch(history: list[dict[str, float]], metric: str,
               higher_is_better: bool = True) -> Optional[int]:
    """The epoch number (from 1) with the best ``metric`` in the history, the earliest of
    equals; None before it is measured."""
    sign = 1.0 if higher_is_better else -1.0
    best: Optional[tuple[float, int]] = None
    for entry in history:
        value = entry.get(metric)
        if value is not None and (best is None or sign * value > best[0]):
            best = (sign * float(value), int(entry["epoch"]))
    return None if best is None else best[1]

