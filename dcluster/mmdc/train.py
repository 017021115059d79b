"""The MMDC epoch loop (paper Algorithm 1), in the shape of DeepCluster's (dcluster/train.py)
and with the same parts (run directory, loaders, checkpoints, MLflow):

    [refinement epochs: k-means on the embeddings -> targets] -> clustering pass (Hungarian
    re-assignment per batch) -> rotation pass -> embeddings of every image -> clusters and
    report -> checkpoint
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import torch

from dcluster.run_setup import set_up_process
from dcluster.checkpoint import save_checkpoint
from dcluster.clustering import kmeans_labels
from dcluster.config import Config, ConfigError, MMDCConfig
from dcluster.distributed import detect_env
from dcluster.epoch_report import assignment_metrics, format_epoch_line
from dcluster.extract import ShardFeatures, extract_features
from dcluster.mmdc.assignment import match_labels
from dcluster.mmdc.model import build_mmdc_model
from dcluster.mmdc.passes import PassContext, clustering_pass, rotation_pass
from dcluster.mmdc.state import MMDCState, pack, unpack
from dcluster.mmdc.targets import TargetBank, nearest_component
from dcluster.optimize import sgd
from dcluster.rundir import RunDir, attach_log_file, prepare_run_dir, save_assignments
from dcluster.run_state import find_resume_checkpoint
from dcluster.seeding import derived_rng, derived_seed
from dcluster.tracking import make_tracker, tracking_uri
from dcluster.train import RunResult, finish_plots

log = logging.getLogger("dcluster.mmdc")


def lr_at(cfg: MMDCConfig, base_lr: float, epoch: int) -> float:
    """The step schedule: divided by lr_decay_factor at each of lr_decay_epochs (the paper:
    by 5 after epoch 350). A pure function of the epoch, so a resume needs no scheduler state."""
    return base_lr / cfg.lr_decay_factor ** sum(epoch >= e for e in cfg.lr_decay_epochs)


def train_mmdc(cfg: Config) -> RunResult:
    env = detect_env()
    if env.world_size > 1:
        raise ConfigError(f"config key 'method' = 'mmdc': runs in a single process for now, "
                          f"this job has {env.world_size}")
    run = prepare_run_dir(cfg)
    attach_log_file(run)
    chash, source, pipelines = set_up_process(cfg)
    my_indices = np.arange(len(source), dtype=np.int64)  # one process owns every image
    bank = TargetBank(len(source), cfg.mmdc, cfg.seed)
    model = build_mmdc_model(cfg).to(env.device)
    base_lr = cfg.optim.lr * (env.world_size if cfg.optim.lr_scaling == "linear" else 1)
    optimizer = sgd([p for p in model.parameters() if p.requires_grad], cfg.optim, base_lr)
    log.info("MMDC: %d images, K=%d components in R^%d (%s means, sigma %g), rotation task %s, "
             "%d + %d refinement epochs", len(source), cfg.mmdc.k, bank.means.shape[1],
             cfg.mmdc.means, cfg.mmdc.sigma, "on" if cfg.mmdc.rotation else "off", cfg.epochs,
             cfg.mmdc.refine_epochs)

    fingerprint = source.fingerprint()
    state = resume(cfg, run, model, optimizer, chash, fingerprint, len(source))
    tracker = make_tracker(cfg, env.is_main)
    state.mlflow_run_id = tracker.start(cfg, run, state.mlflow_run_id)
    state.n_clusters = cfg.mmdc.k
    ctx = PassContext(model, pipelines, optimizer, 0, cfg.optim.batch_size, env.device,
                      cfg.progress, env.is_main)
    total = cfg.epochs + cfg.mmdc.refine_epochs
    last_ckpt = None
    embeddings: Optional[ShardFeatures] = None  # the last report pass; weights unchanged since

    def embed_all() -> ShardFeatures:
        return extract_features(model, pipelines, my_indices, cfg.optim.batch_size, env.device,
                                cfg.progress, env.is_main, compute=model.embed)

    try:
        for epoch in range(state.next_epoch, total):
            ctx.epoch = epoch
            lr = lr_at(cfg.mmdc, base_lr, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            metrics: dict[str, float] = {"lr": lr}

            # refinement stage: targets from k-means on the embeddings
            t0 = time.perf_counter()
            if epoch >= cfg.epochs:
                embeddings = embeddings or embed_all()
                state.refined = refine_targets(embeddings, state, bank, cfg, epoch)
            else:
                state.refined = None
            metrics["time_clustering"] = time.perf_counter() - t0

            # clustering pass (Hungarian re-assignment per batch), then the rotation pass
            t0 = time.perf_counter()
            order = derived_rng(cfg.seed, epoch, "order").permutation(my_indices)
            stats = clustering_pass(ctx, order, bank, state.assignment, state.refined)
            metrics.update(loss=stats.loss, moved_fraction=stats.moved / max(stats.images, 1))
            if cfg.mmdc.rotation:
                rot_order = derived_rng(cfg.seed, epoch, "rotation_order").permutation(my_indices)
                metrics["loss_rotation"] = rotation_pass(ctx, rot_order, len(source)).loss
            metrics["time_training"] = time.perf_counter() - t0
            state.bad_images.update(pipelines.bad_indices)

            # clusters: the component nearest each embedding (paper eq. 3)
            t0 = time.perf_counter()
            embeddings = embed_all()
            labels = np.full(len(source), -1, dtype=np.int64)
            labels[embeddings.indices] = nearest_component(embeddings.features, bank.means)
            state.previous_labels, state.labels = state.labels, labels
            metrics["time_features"] = time.perf_counter() - t0
            metrics.update(assignment_metrics(labels, state.previous_labels, source.targets))
            sizes = np.bincount(labels[labels >= 0], minlength=cfg.mmdc.k)
            metrics.update(clusters_empty=float((sizes == 0).sum()),
                           largest_cluster=float(sizes.max() / max(sizes.sum(), 1)),
                           bad_images=float(len(state.bad_images)))
            state.history.append({"epoch": float(epoch), **metrics})
            state.next_epoch = epoch + 1
            if env.is_main:
                log.info("%s | rotation loss %.4f | targets moved %.1f%%",
                         format_epoch_line(epoch, total, metrics),
                         metrics.get("loss_rotation", float("nan")),
                         100 * metrics["moved_fraction"])
                tracker.log_metrics(metrics, step=epoch)
                save_assignments(run, epoch, labels)

            if env.is_main and (state.next_epoch % cfg.checkpoint.interval == 0
                                or state.next_epoch == total):
                last_ckpt = save_checkpoint(run.checkpoints,
                                            pack(state, model, optimizer, chash, fingerprint),
                                            epoch=state.next_epoch,
                                            keep_last=cfg.checkpoint.keep_last)
    except BaseException as err:
        tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise

    if env.is_main and state.labels is not None:
        finish_plots(cfg, run, state, tracker)
    tracker.finish()
    return RunResult(run_dir=run.root, checkpoint=last_ckpt,
                     mlflow_uri=tracking_uri(cfg) if cfg.tracking.enabled else None,
                     mlflow_run_id=state.mlflow_run_id, history=state.history)


def resume(cfg: Config, run: RunDir, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           chash: str, fingerprint: str, n_images: int) -> MMDCState:
    """A fresh state (every image on its own drawn target: the draws are i.i.d., so the
    identity is as random an initial assignment as any) or the one of a checkpoint."""
    found = find_resume_checkpoint(cfg, run)
    if found is None:
        return MMDCState(assignment=np.arange(n_images, dtype=np.int64))
    payload, path = found
    state = unpack(payload, model, optimizer, chash, fingerprint, str(path))
    log.info("resuming from %s at epoch %d", path, state.next_epoch)
    return state


def refine_targets(embeddings: ShardFeatures, state: MMDCState, bank: TargetBank, cfg: Config,
                   epoch: int) -> np.ndarray:
    """The component each image is pulled to in a refinement epoch (paper III.E): its k-means
    cluster (k = K, on the embeddings), numbered to agree most with the components the images
    were pulled to so far, so that the clusters keep their targets."""
    before = state.refined if state.refined is not None else bank.components[state.assignment]
    clusters = kmeans_labels(embeddings.features, cfg.mmdc.k, derived_seed(cfg.seed, epoch, "refine"),
                             cfg.clustering.niter, cfg.clustering.device, plus_plus=True)
    refined = np.full(len(bank), -1, dtype=np.int64)
    refined[embeddings.indices] = match_labels(clusters, before[embeddings.indices], cfg.mmdc.k)
    return refined
