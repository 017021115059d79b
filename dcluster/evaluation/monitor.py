"""The online monitor: every ``monitor.every`` epochs (and after the last), the measures of
`dcluster eval knn` and `dcluster eval clusters` on the network as it stands, so that a long
run tells whether its features still improve, and which epoch is the best (the checkpoint
kept by checkpoint.keep_best).

The true labels are read here only, never by training: the weighted k-NN takes the train
split as its memory and scores the held-out split (eval.val_path, or eval.val_fraction of each
class, the same split as `dcluster eval`); the class k-means probe clusters every image of
data.path. Both use the evaluation's own functions, features and seeds, so an epoch's
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
from dcluster.evaluation.features import split_rows
from dcluster.evaluation.knn import knn_scores
from dcluster.evaluation.scoring import topk_accuracy
from dcluster.evaluation.splits import Split, open_splits, stratified_split
from dcluster.core.metric_spec import Metric, declared
from dcluster.models import DeepClusterNet
from dcluster.core.seeding import derived_seed

log = logging.getLogger("dcluster.evaluation.monitor")

def monitored(cfg: Config, epoch_number: int, epochs: int) -> bool:
    """Whether epoch ``epoch_number`` (counted from 1) is measured."""
    every = cfg.monitor.every
    return every > 0 and (epoch_number % every == 0 or epoch_number == epochs)


class Monitor:
    """The held-out split and the measurement; built once per run on every rank (the
    feature passes are shared among the ranks, the scores computed on rank 0)."""

    def __init__(self, cfg: Config, source: ImageSource, pipelines: Pipelines) -> None:
        check_key(source.targets is not None, "monitor.every", cfg.monitor.every,
                  f"the monitor needs labels, i.e. class folders in data.path {cfg.data.path!r}")
        self.cfg = cfg
        if cfg.eval.val_path:
            self.train, self.val = open_splits(cfg)
            self.images = self.train  # every image of data.path
        else:  # the training loaders serve both sides: one feature pass over data.path
            assert source.targets is not None
            train_idx, val_idx = stratified_split(source.targets, cfg.eval.val_fraction, cfg.seed)
            self.train = Split(source, pipelines, train_idx)
            self.val = Split(source, pipelines, val_idx)
            self.images = Split(source, pipelines, np.arange(len(source), dtype=np.int64))
        check_key(cfg.eval.knn.k <= len(self.train.indices), "eval.knn.k", cfg.eval.knn.k,
                  f"more neighbours than images in the monitor's train split "
                  f"({len(self.train.indices)})")
        log.info("monitor: every %d epoch(s), k-NN (k=%d) of %d held-out images against %d, "
                 "k-means probe on %d", cfg.monitor.every, cfg.eval.knn.k, len(self.val.indices),
                 len(self.train.indices), len(self.images.indices))

    def measure(self, model: nn.Module, epoch_number: int, env: Env,
                comm: Comm) -> dict[str, float]:
        """The ``monitor_*`` values of the network after epoch ``epoch_number`` (from 1), the
        same on every rank."""
        backbone = model.backbone if hasattr(model, "backbone") else model
        assert isinstance(backbone, DeepClusterNet)
        scores = self._scores(model, backbone, epoch_number, env, comm)
        return comm.broadcast_object(scores)

    def _rows(self, model: nn.Module, backbone: DeepClusterNet, split: Split, env: Env,
              comm: Comm) -> Optional[tuple[np.ndarray, np.ndarray]]:
        cfg = self.cfg
        return split_rows(model, split, cfg.eval.batch_size, env, comm, cfg.progress,
                          compute=backbone.clustering_features)

    def _scores(self, model: nn.Module, backbone: DeepClusterNet, epoch_number: int, env: Env,
                comm: Comm) -> Optional[dict[str, float]]:
        cfg = self.cfg
        rows = self._rows(model, backbone, self.images, env, comm)
        if self.val.source is not self.images.source:
            val_rows = self._rows(model, backbone, self.val, env, comm)
        if rows is None:
            return None
        features, indices = rows
        labels = self.images.source.targets[indices]
        if self.val.source is self.images.source:
            held_out = np.isin(indices, self.val.indices)
            x_train, y_train = features[~held_out], labels[~held_out]
            x_val, y_val = features[held_out], labels[held_out]
        else:
            x_train, y_train = features, labels
            x_val, y_val = val_rows[0], self.val.source.targets[val_rows[1]]
        votes = knn_scores(x_train, y_train, x_val, cfg.eval.knn.k, cfg.eval.knn.temperature,
                           len(self.images.source.class_names), cfg.clustering.device)
        knn = topk_accuracy(votes, y_val)
        # the seed of `dcluster eval clusters` on this epoch's checkpoint
        kmeans = kmeans_scores(features, labels,
                               derived_seed(cfg.seed, epoch_number, "eval_kmeans"),
                               cfg.clustering.niter, cfg.clustering.device,
                               cfg.clustering.backend)
        values = (knn["top1"], knn["top5"], kmeans["nmi"], kmeans["acc"])
        return dict(zip(MONITOR_METRICS, values))


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

