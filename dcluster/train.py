"""The DeepCluster epoch loop, top to bottom (paper section 3, DESIGN.md):

    features -> PCA/whiten/L2 + k-means -> balanced order -> fresh head -> train -> report
    -> checkpoint

Each step lives in its own module; this one only wires them together and decides what is
rank 0's duty.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dcluster.checkpoint import load_checkpoint, load_latest, save_checkpoint
from dcluster.clustering import cluster_features, kmeans_labels
from dcluster.clustering.pca import l2_normalize
from dcluster.config import Config, config_hash
from dcluster.data import build_pipelines, open_source
from dcluster.distributed import detect_env
from dcluster.epoch_report import assignment_metrics, format_epoch_line
from dcluster.extract import extract_features
from dcluster.metrics import clustering_accuracy, nmi
from dcluster.models import build_model
from dcluster.optimize import body_optimizer, sgd, train_one_epoch
from dcluster.rundir import RunDir, attach_log_file, prepare_run_dir, save_assignments
from dcluster.run_state import RunState, pack, unpack
from dcluster.sampler import balanced_order
from dcluster.seeding import derived_seed, seed_everything
from dcluster.tracking import make_tracker, tracking_uri
from dcluster.plots import plot_cluster_sizes, plot_nmi_curves

log = logging.getLogger("dcluster.train")


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Optional[Path]
    mlflow_uri: Optional[str]
    mlflow_run_id: Optional[str]
    history: list[dict[str, float]]


def train(cfg: Config) -> RunResult:
    env = detect_env()
    run = prepare_run_dir(cfg)
    attach_log_file(run)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    chash = config_hash(cfg)

    source = open_source(cfg.data)
    pipelines = build_pipelines(source, cfg.data, cfg.seed)
    my_indices = np.arange(len(source), dtype=np.int64)  # one process owns every image
    model = build_model(cfg.model, cfg.data.crop_size).to(env.device)
    lr = cfg.optim.lr * (env.world_size if cfg.optim.lr_scaling == "linear" else 1)
    log.info("%d images, %s; batch %d per process, effective %d, lr %g (scaling: %s)",
             len(source), f"{len(source.class_names)} classes" if source.class_names else "no classes",
             cfg.optim.batch_size, cfg.optim.batch_size * env.world_size, lr, cfg.optim.lr_scaling)
    body_opt = body_optimizer(model, cfg.optim, lr)

    def head_optimizer(head: torch.nn.Module) -> torch.optim.Optimizer:
        return sgd(head.parameters(), cfg.optim, lr)

    fingerprint = source.fingerprint()
    state, head_opt = resume(cfg, run, model, body_opt, head_optimizer, chash, fingerprint)
    tracker = make_tracker(cfg, env.is_main)
    state.mlflow_run_id = tracker.start(cfg, run, state.mlflow_run_id)
    last_ckpt: Optional[Path] = None
    show = env.is_main

    try:
        for epoch in range(state.next_epoch, cfg.epochs):
            metrics: dict[str, float] = {}
            recluster = state.labels is None or epoch % cfg.clustering.every == 0

            # 1-2. features of this process's shard, then PCA/whitening/L2 and clustering
            if recluster:
                t0 = time.perf_counter()
                shard = extract_features(model, pipelines, my_indices, cfg.optim.batch_size,
                                         env.device, cfg.progress, show)
                state.bad_images.update(pipelines.bad_indices)
                metrics["time_features"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                result = cluster_features(shard.features, cfg.clustering,
                                          seed=derived_seed(cfg.seed, epoch, "kmeans"))
                labels = np.full(len(source), -1, dtype=np.int64)
                labels[shard.indices] = result.labels
                state.previous_labels, state.labels = state.labels, labels
                state.n_clusters = result.n_clusters
                metrics["time_clustering"] = time.perf_counter() - t0
                metrics.update(objective=result.objective, n_clusters=result.n_clusters,
                               n_empty=result.n_empty, n_reseeded=result.n_reseeded)
                log.info("clustering: %s, %d clusters, objective %.5g, %d empty, %d re-seeded",
                         result.backend, result.n_clusters, result.objective, result.n_empty,
                         result.n_reseeded)
                if cfg.eval.class_kmeans and source.targets is not None:
                    metrics.update(class_probe(shard.features, source.targets[shard.indices],
                                               cfg, epoch))
                # 4 (prepared here). a fresh head for the new pseudo-labels, identical on every
                # process because it is drawn from (seed, epoch)
                head = model.reset_head(state.n_clusters, torch.Generator().manual_seed(
                    derived_seed(cfg.seed, epoch, "head")))
                head_opt = head_optimizer(head)
            else:
                metrics.update(time_features=0.0, time_clustering=0.0)

            # 3. the epoch's order: uniform over the non-empty clusters
            order = balanced_order(state.labels, cfg.seed, epoch)

            # 4. train on the pseudo-labels
            t0 = time.perf_counter()
            stats = train_one_epoch(model, pipelines, order, state.labels, epoch, cfg.optim.batch_size,
                                    [body_opt, head_opt], env.device, cfg.progress, show)
            metrics["time_training"] = time.perf_counter() - t0
            metrics["loss"] = stats.loss
            metrics["bad_images"] = float(len(state.bad_images))

            # 5. report (rank 0)
            if recluster:
                metrics.update(assignment_metrics(state.labels, state.previous_labels, source.targets))
            state.history.append({"epoch": float(epoch), **metrics})
            state.next_epoch = epoch + 1
            if env.is_main:
                log.info(format_epoch_line(epoch, cfg.epochs, metrics))
                tracker.log_metrics(metrics, step=epoch)
                save_assignments(run, epoch, state.labels)

            # 6. checkpoint (rank 0), atomically
            if env.is_main and (state.next_epoch % cfg.checkpoint.interval == 0
                                or state.next_epoch == cfg.epochs):
                last_ckpt = save_checkpoint(run.checkpoints, pack(state, model, body_opt, head_opt, chash, fingerprint),
                                            epoch=state.next_epoch, keep_last=cfg.checkpoint.keep_last)

    except BaseException as err:
        # the MLflow run shows why it stopped; a resumed job sets it RUNNING again
        tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise

    if env.is_main:
        finish_plots(cfg, run, state, tracker)
    tracker.finish()
    return RunResult(run_dir=run.root, checkpoint=last_ckpt, mlflow_uri=tracking_uri(cfg) if cfg.tracking.enabled else None,
                     mlflow_run_id=state.mlflow_run_id, history=state.history)


def resume(cfg: Config, run: RunDir, model, body_opt, head_optimizer, chash: str,
           fingerprint: str):
    """The state to start from: a fresh one, or the newest valid checkpoint (resume=auto), or
    the named one (resume=<path>)."""
    if cfg.resume == "never":
        return RunState(), None
    if cfg.resume == "auto":
        found = load_latest(run.checkpoints)
        if found is None:
            return RunState(), None
        payload, path = found
    else:
        path = Path(cfg.resume)
        payload = load_checkpoint(path)
    state, head_opt = unpack(payload, model, body_opt, head_optimizer, chash, fingerprint,
                             str(path))
    log.info("resuming from %s at epoch %d", path, state.next_epoch)
    return state, head_opt


def class_probe(features: np.ndarray, targets: np.ndarray, cfg: Config, epoch: int) -> dict[str, float]:
    """k-means with k = number of classes on this epoch's features (centred, L2-normalised,
    not whitened: whitening lifts noise directions to unit variance), scored against the
    classes. A label-free measure of feature quality that, unlike NMI of the pseudo-labels,
    does not depend on k."""
    x = l2_normalize(features - features.mean(axis=0, dtype=np.float64).astype(np.float32))
    n_classes = int(targets.max()) + 1
    pred = kmeans_labels(x, n_classes, derived_seed(cfg.seed, epoch, "probe"),
                         cfg.clustering.niter, cfg.clustering.device)
    return {"probe_nmi": nmi(pred, targets), "probe_acc": clustering_accuracy(pred, targets)}


def finish_plots(cfg: Config, run: RunDir, state: RunState, tracker) -> None:
    if not cfg.tracking.plots or not state.history:
        return
    curves = plot_nmi_curves(state.history, run.plots / "nmi_curves.png")
    sizes = plot_cluster_sizes(np.bincount(state.labels[state.labels >= 0],
                                           minlength=state.n_clusters),
                               run.plots / "cluster_sizes.png")
    for path in (curves, sizes):
        tracker.log_artifact(path)
