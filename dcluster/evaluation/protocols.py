"""The three protocols, end to end: target -> network -> features through the training
loaders -> scores -> table, JSON, MLflow. Each protocol function returns (metrics, settings)
on rank 0 and None on the other ranks, which share the feature passes and the linear probe's
training (DDP, each rank its slice of every epoch's order)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from dcluster.parallel.collectives import Comm
from dcluster.core.config import ConfigError, check_key
from dcluster.parallel.distributed import Env, detect_env, process_group
from dcluster.evaluation.clusters import kmeans_scores, scores_on_main
from dcluster.evaluation.features import own_share, shard_features
from dcluster.evaluation.knn import knn_accuracy
from dcluster.evaluation.linear import LinearProbe, probe_scores, train_probe
from dcluster.evaluation.network import Network, NetworkRecipe, load_network
from dcluster.evaluation.report import EvalResult, log_to_mlflow, write_json
from dcluster.evaluation.scoring import hits_to_accuracy, topk_hits
from dcluster.evaluation.splits import Split, all_labelled, open_splits
from dcluster.evaluation.target import EvalTarget, resolve_target
from dcluster.parallel.hardware import require_fitting_build, set_torch_threads
from dcluster.models import LayerTap
from dcluster.runtime.sampler import rank_slice
from dcluster.core.seeding import derived_rng, derived_seed

log = logging.getLogger("dcluster.eval")

Outcome = tuple[dict[str, float], dict[str, Any]]


def knn_protocol(target: EvalTarget, net: Network, env: Env, comm: Comm) -> Optional[Outcome]:
    """Weighted kNN on the penultimate features: train split as the memory, val split scored;
    each rank keeps its share of both (knn.py searches them where they are)."""
    cfg = target.cfg
    train, val = open_splits(cfg)
    check_key(cfg.eval.knn.k <= len(train.indices), "eval.knn.k", cfg.eval.knn.k,
              f"more neighbours than images in the train split ({len(train.indices)})")
    x_train, y_train = _penultimate(net, train, target, env)
    x_val, y_val = _penultimate(net, val, target, env)
    metrics = knn_accuracy(x_train, y_train, x_val, y_val, cfg.eval.knn.k,
                           cfg.eval.knn.temperature, len(train.source.class_names), comm,
                           env.device, cfg.progress)
    sizes = comm.all_reduce_sum(np.array([len(y_train), len(y_val)], dtype=np.int64))
    if not comm.is_main:
        return None
    return metrics, {"k": cfg.eval.knn.k, "temperature": cfg.eval.knn.temperature,
                     "feature_dim": x_train.shape[1], "train_images": int(sizes[0]),
                     "val_images": int(sizes[1])}


def clusters_protocol(target: EvalTarget, net: Network, env: Env,
                      comm: Comm) -> Optional[Outcome]:
    """k-means (k = classes) on the penultimate features of every image; for a network that
    clusters by itself also its own clusters (MMDC's nearest mixture components: paper
    Table I), as ``head_*``, and the same k-means on the embedding it clusters in, as
    ``embed_*`` (DeepCluster-v2 clusters its projection head's output, not the backbone's
    features: the two can differ by far). Sharded: each rank keeps its rows (clusters.py)."""
    cfg = target.cfg
    images = all_labelled(cfg)
    features, labels = _penultimate(net, images, target, env)

    def probe(rows: np.ndarray, rows_labels: np.ndarray) -> dict[str, float]:
        return kmeans_scores(rows, rows_labels,
                             derived_seed(cfg.seed, target.epoch, "eval_kmeans"), comm,
                             env.device, cfg.clustering.niter, cfg.clustering.device,
                             cfg.clustering.backend)

    metrics = probe(features, labels)
    own = net.own_clusters
    if own is not None:
        embedded, indices = shard_features(net.module, images, cfg.eval.batch_size, env,
                                           cfg.progress, compute=own.embed)
        own_labels = images.source.targets[indices]
        scores = scores_on_main(own.assign(embedded), own_labels, comm)
        metrics.update({f"head_{key}": value for key, value in (scores or {}).items()})
        metrics.update({f"embed_{key}": value
                        for key, value in probe(embedded, own_labels).items()})
    n_images = int(comm.all_reduce_sum(np.array([len(labels)], dtype=np.int64))[0])
    if not comm.is_main:
        return None
    n_classes = len(np.unique(images.source.targets[images.indices]))
    return metrics, {"k": n_classes, "feature_dim": features.shape[1], "images": n_images}


def linear_protocol(target: EvalTarget, net: Network, env: Env,
                    comm: Comm) -> Optional[Outcome]:
    """A linear classifier on the frozen layer eval.linear.layer, trained on augmented crops of
    the train split, scored on the centre crops of the val split."""
    cfg, lc = target.cfg, target.cfg.eval.linear
    try:
        tap = LayerTap(net.backbone, cfg.model.arch, lc.layer)
    except ValueError as err:
        raise ConfigError(f"config key 'eval.linear.layer' = {lc.layer!r}: {err}") from None
    train, val = open_splits(cfg)
    with torch.no_grad():
        probe_input = torch.zeros(1, 3, cfg.data.crop_size, cfg.data.crop_size, device=env.device)
        channels, size = tap(probe_input).shape[1:3]
    probe = LinearProbe(channels, size, lc.pooled_dim, len(train.source.class_names)).to(env.device)

    def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = derived_rng(cfg.seed, epoch, "linear_order").permutation(train.indices)
        mine = rank_slice(order, env.rank, env.world_size)
        for batch in train.pipelines.train_batches(mine, epoch, lc.batch_size):
            targets = torch.from_numpy(train.source.targets[batch.indices.numpy()])
            yield _frozen(tap, batch.images, env), targets.to(env.device)

    def val_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in val.pipelines.feature_batches(own_share(val.indices, env), lc.batch_size):
            yield (_frozen(tap, batch.images, env),
                   torch.from_numpy(val.source.targets[batch.indices.numpy()]))

    losses = train_probe(probe, train_batches, lc, env, comm)
    scores, labels = probe_scores(probe, val_batches())  # this rank's share of the val split
    hits = comm.all_reduce_sum(np.append(topk_hits(scores, labels), len(labels)))
    if not comm.is_main:
        return None
    return {**hits_to_accuracy(hits[:-1], int(hits[-1])), "train_loss": losses[-1]}, {
        "layer": tap.layer, "pooled_dim": probe.dim, "epochs": lc.epochs, "lr": lc.lr,
        "weight_decay": lc.weight_decay, "batch_size": lc.batch_size,
        "train_images": len(train.indices), "val_images": int(hits[-1])}


def _penultimate(net: Network, split: Split, target: EvalTarget,
                 env: Env) -> tuple[np.ndarray, np.ndarray]:
    """This rank's (features, classes) of its share of ``split``."""
    cfg = target.cfg
    features, indices = shard_features(net.module, split, cfg.eval.batch_size, env,
                                       cfg.progress, compute=net.backbone.clustering_features)
    return features, split.source.targets[indices]


@torch.no_grad()
def _frozen(tap: LayerTap, images: torch.Tensor, env: Env) -> torch.Tensor:
    return tap(images.to(env.device, non_blocking=True))


PROTOCOLS: dict[str, Callable[[EvalTarget, Network, Env, Comm], Optional[Outcome]]] = {
    "linear": linear_protocol, "knn": knn_protocol, "clusters": clusters_protocol}


def evaluate(protocol: str, target_path: str | Path, recipes: Mapping[str, NetworkRecipe],
             schema: type, overrides: Sequence[str] = (),
             out: Optional[Path] = None) -> Optional[tuple[EvalResult, Path]]:
    """Run one protocol on a run directory, checkpoint or config, in this process's part of
    the job (launched like training: torchrun, Slurm, submitit or alone). Rank 0 writes the
    JSON (to ``out`` or the target's default place) and the MLflow record, and returns the
    result with the JSON path; the other ranks return None. ``recipes``: how each method
    rebuilds its network (dcluster.methods.METHODS); ``schema``: what the target's config is
    read with (dcluster.methods.Config)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol {protocol!r}; "
                          f"available: {', '.join(PROTOCOLS)}")
    target = resolve_target(target_path, overrides, recipes, schema)
    cfg = target.cfg
    set_torch_threads(cfg.threads)
    require_fitting_build(cfg)
    env = detect_env()
    net = load_network(cfg, target.payload, env.device, recipes)
    log.info("eval %s of %s (%s, %s)", protocol, target.describe(), cfg.method, cfg.model.arch)
    t0 = time.perf_counter()
    with process_group(env, cfg.distributed):
        comm = Comm(env, timeout_s=cfg.distributed.timeout_s)
        outcome = PROTOCOLS[protocol](target, net, env, comm)
        comm.barrier()
    if outcome is None:
        return None
    name = f"linear_{outcome[1]['layer']}" if protocol == "linear" else protocol
    result = EvalResult(name, target, *outcome, time.perf_counter() - t0)
    path = write_json(result, out or target.default_output(name))
    log_to_mlflow(result, path)
    return result, path
