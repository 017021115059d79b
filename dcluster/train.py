"""The DeepCluster epoch loop, top to bottom (paper section 3, DESIGN.md):

    features of my shard -> PCA/whiten/L2 + k-means across ranks -> balanced order, my slice
    -> fresh head -> train (DDP) -> report -> checkpoint

Each step lives in its own module; this one only wires them together and decides what is
rank 0's duty. A stop signal (dcluster/stop.py) is acted on where all ranks agree: after the
feature pass, before the training pass and after any training iteration, with a checkpoint
of exactly where the epoch stands (mid-epoch ones included), from which a resume continues. The same code runs for one process and for many: with one, every collective is
the identity (dcluster/collectives.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dcluster.run_setup import set_up_process
from dcluster.checkpoint import capture_rng_state, load_checkpoint, save_checkpoint
from dcluster.clustering.distributed_stage import (cluster_shards, global_mean, own_gpu,
                                                   row_layout, rows_of, spread_labels)
from dcluster.clustering.pca import l2_normalize
from dcluster.clustering.sharded_kmeans import sharded_kmeans
from dcluster.collectives import Comm
from dcluster.config import Config
from dcluster.distributed import Env, detect_env, my_indices, process_group
from dcluster.epoch_report import assignment_metrics, format_epoch_line
from dcluster.extract import ShardFeatures, extract_features
from dcluster.metrics import clustering_accuracy, nmi
from dcluster.models import build_model
from dcluster.optimize import (EpochProgress, align_replicas, body_optimizer, data_parallel,
                               epoch_loss, sgd, train_one_epoch)
from dcluster.rundir import RunDir, attach_log_file, prepare_run_dir, save_assignments
from dcluster.run_state import (InterruptedEpoch, RunState, continue_streams,
                                find_resume_checkpoint, pack, unpack)
from dcluster.stop import StopPoints, StopRequest, TrainingStopped
from dcluster.sampler import balanced_order, rank_slice
from dcluster.seeding import derived_seed
from dcluster.tracking import make_tracker, tracking_uri
from dcluster.plots import plot_cluster_sizes, plot_nmi_curves

log = logging.getLogger("dcluster.train")


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Optional[Path]
    mlflow_uri: Optional[str]
    mlflow_run_id: Optional[str]
    history: list[dict[str, float]]  # rank 0's is the run's (other ranks skip the reports)
    rank: int = 0  # of the process that returns it: rank 0 alone speaks for the run


def train(cfg: Config) -> RunResult:
    env = detect_env()
    with process_group(env, cfg.distributed), StopRequest() as stop_request:
        return train_epochs(cfg, env, Comm(env), stop_request)


def train_epochs(cfg: Config, env: Env, comm: Comm,
                 stop_request: Optional[StopRequest] = None) -> RunResult:
    run = shared_run_dir(cfg, comm)
    chash, source, pipelines = set_up_process(cfg)
    mine = my_indices(len(source), env)  # a contiguous shard: every image on exactly one rank
    model = build_model(cfg.model, cfg.data.crop_size).to(env.device)
    lr = cfg.optim.lr * (env.world_size if cfg.optim.lr_scaling == "linear" else 1)
    log.info("%d images, %s; batch %d per process, effective %d, lr %g (scaling: %s)",
             len(source), f"{len(source.class_names)} classes" if source.class_names else "no classes",
             cfg.optim.batch_size, cfg.optim.batch_size * env.world_size, lr, cfg.optim.lr_scaling)
    body_opt = body_optimizer(model, cfg.optim, lr)

    def head_optimizer(head: torch.nn.Module) -> torch.optim.Optimizer:
        return sgd(head.parameters(), cfg.optim, lr)

    fingerprint = source.fingerprint()
    state, head_opt, last_ckpt = resume(cfg, run, model, body_opt, head_optimizer, chash,
                                        fingerprint, env, comm)
    # the (epoch, step) of the newest checkpoint of this run: a stop there needs no new one
    saved_at = ((state.next_epoch, state.in_epoch.step if state.in_epoch else 0)
                if last_ckpt else None)
    tracker = make_tracker(cfg, env.is_main)
    state.mlflow_run_id = tracker.start(cfg, run, state.mlflow_run_id)
    net = data_parallel(model, env) if model.head is not None else None
    stops = StopPoints(stop_request or StopRequest(), cfg.checkpoint, comm)
    show = env.is_main

    def save(epoch: int, step: int = 0,
             interrupted: Optional[InterruptedEpoch] = None) -> Optional[Path]:
        """Rank 0 commits the run state as checkpoint (epoch, step); the others wait for it."""
        path = None
        if env.is_main:
            path = save_checkpoint(run.checkpoints,
                                   pack(replace(state, in_epoch=interrupted), model, body_opt,
                                        head_opt, chash, fingerprint),
                                   epoch=epoch, iteration=step, keep_last=cfg.checkpoint.keep_last)
        comm.barrier()
        stops.saved()
        return path

    try:
        for epoch in range(state.next_epoch, cfg.epochs):
            interrupted, state.in_epoch = state.in_epoch, None
            if interrupted:  # resumed inside this epoch: its labels and head are restored
                metrics, recluster = dict(interrupted.metrics), interrupted.reclustered
                done = EpochProgress(**interrupted.ranks[env.rank]["progress"])
            else:
                metrics, recluster = {}, state.labels is None or epoch % cfg.clustering.every == 0
                done = EpochProgress()

            # 1-2. features of this rank's shard, then PCA/whitening/L2 and clustering across
            # ranks; every rank ends with the labels of all N images
            if recluster and not interrupted:
                t0 = time.perf_counter()
                shard = extract_features(model, pipelines, mine, cfg.optim.batch_size,
                                         env.device, cfg.progress, show,
                                         stop=lambda: bool(stops.request.signum))
                signum = stops.agreed_stop()  # nothing of the epoch is lost by stopping here
                if signum:
                    if saved_at != (epoch, 0):
                        last_ckpt = save(epoch)
                    raise TrainingStopped(signum, last_ckpt, epoch, 0)
                record_bad_images(state, pipelines.bad_indices, comm)
                metrics["time_features"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                result = cluster_shards(shard.features, shard.indices, len(source), cfg.clustering,
                                        comm, derived_seed(cfg.seed, epoch, "kmeans"), env.device)
                state.previous_labels, state.labels = state.labels, result.labels
                state.n_clusters = result.n_clusters
                metrics["time_clustering"] = time.perf_counter() - t0
                metrics.update(objective=result.objective, n_clusters=result.n_clusters,
                               n_empty=result.n_empty, n_reseeded=result.n_reseeded)
                log.info("clustering: %s, %d clusters, objective %.5g, %d empty, %d re-seeded",
                         result.backend, result.n_clusters, result.objective, result.n_empty,
                         result.n_reseeded)
                if cfg.eval.class_kmeans and source.targets is not None:
                    metrics.update(class_probe(shard, source.targets, cfg, epoch, comm, env.device))
                # 4 (prepared here). a fresh head for the new pseudo-labels, identical on every
                # rank because it is drawn from (seed, epoch); re-wrapped so DDP syncs it
                head = model.reset_head(state.n_clusters, torch.Generator().manual_seed(
                    derived_seed(cfg.seed, epoch, "head")))
                head_opt = head_optimizer(head)
                net = data_parallel(model, env)
            elif not recluster:
                metrics.update(time_features=0.0, time_clustering=0.0)

            # 3. the epoch's order: uniform over the non-empty clusters, the same global list
            # on every rank, of which each takes its own equal slice
            order = rank_slice(balanced_order(state.labels, cfg.seed, epoch), env.rank,
                               env.world_size)

            # 4. train on the pseudo-labels; dropout draws from a (seed, epoch, rank) stream,
            # so ranks differ from each other and a resumed epoch repeats itself (a resumed
            # interrupted epoch continues the stream it saved). The pass pauses, all ranks
            # after the same iteration, for a mid-epoch checkpoint or a stop signal.
            t0 = time.perf_counter()
            if not interrupted:
                torch.manual_seed(derived_seed(cfg.seed, epoch, "dropout", env.rank))
            while pause := train_one_epoch(net, pipelines, order, state.labels, epoch,
                                           cfg.optim.batch_size, [body_opt, head_opt], env.device,
                                           cfg.progress, show, done, stops):
                metrics["time_training"] = metrics.get("time_training", 0.0) + time.perf_counter() - t0
                t0 = time.perf_counter()
                where = epoch_so_far(done, metrics, recluster, comm)
                if saved_at != (epoch, where.step):  # else: stopped again where it resumed
                    last_ckpt = save(epoch, where.step, where)
                    saved_at = (epoch, where.step)
                if pause.signum:
                    raise TrainingStopped(pause.signum, last_ckpt, epoch, done.iterations)
            align_replicas(model, comm)
            metrics["time_training"] = metrics.get("time_training", 0.0) + time.perf_counter() - t0
            metrics["loss"] = epoch_loss(done, comm)
            metrics["bad_images"] = float(len(state.bad_images))

            # 5. report (rank 0)
            state.next_epoch = epoch + 1
            if env.is_main:
                if recluster:
                    metrics.update(assignment_metrics(state.labels, state.previous_labels,
                                                      source.targets))
                log.info(format_epoch_line(epoch, cfg.epochs, metrics))
                tracker.log_metrics(metrics, step=epoch)
                save_assignments(run, epoch, state.labels)
            state.history.append({"epoch": float(epoch), **metrics})

            # 6. checkpoint (rank 0), atomically
            if state.next_epoch % cfg.checkpoint.interval == 0 or state.next_epoch == cfg.epochs:
                last_ckpt = save(state.next_epoch)
                saved_at = (state.next_epoch, 0)

        if env.is_main:
            finish_plots(cfg, run, state, tracker)
        # no rank reports success before rank 0's last checkpoint and plots are written
        comm.barrier()
    except BaseException as err:
        # the MLflow run shows why it stopped; a resumed job sets it RUNNING again
        stopped = isinstance(err, (KeyboardInterrupt, TrainingStopped))
        tracker.finish("KILLED" if stopped else "FAILED")
        raise

    tracker.finish()
    return RunResult(run_dir=run.root, checkpoint=last_ckpt, mlflow_uri=tracking_uri(cfg) if cfg.tracking.enabled else None,
                     mlflow_run_id=state.mlflow_run_id, history=state.history, rank=env.rank)


def shared_run_dir(cfg: Config, comm: Comm) -> RunDir:
    """Rank 0 creates (or checks and reuses) the run directory; the others learn its path once
    it is ready. Every rank appends to its log: rank 0 all records, the others only errors, so
    that a rank's failure is in train.log too."""
    run = prepare_run_dir(cfg) if comm.is_main else None
    root, resumed = comm.broadcast_object((str(run.root), run.resumed) if run else None)
    run = run or RunDir(Path(root), resumed)
    handler = attach_log_file(run)
    if not comm.is_main:
        handler.setLevel(logging.ERROR)
    return run


def resume(cfg: Config, run: RunDir, model, body_opt, head_optimizer, chash: str,
           fingerprint: str, env: Env, comm: Comm):
    """The state to start from, with the head's optimiser and the checkpoint's path: a fresh
    one, or the newest valid checkpoint (resume=auto), or the named one (resume=<path>). Rank 0
    chooses the file, so that every rank resumes from the same one."""
    found = find_resume_checkpoint(cfg, run) if comm.is_main else None
    path = comm.broadcast_object(str(found[1].resolve()) if found else None)
    if path is None:
        return RunState(), None, None
    payload = found[0] if found else load_checkpoint(Path(path))
    state, head_opt = unpack(payload, model, body_opt, head_optimizer, chash, fingerprint, path)
    continue_streams(state, env.rank, env.world_size, path)
    if state.in_epoch:
        log.info("resuming from %s inside epoch %d, after its %s", path, state.next_epoch,
                 f"iteration {state.in_epoch.step - 1}" if state.in_epoch.step > 1 else "clustering")
    else:
        log.info("resuming from %s at epoch %d", path, state.next_epoch)
    return state, head_opt, Path(path)


def epoch_so_far(done: EpochProgress, metrics: dict[str, float], reclustered: bool,
                 comm: Comm) -> InterruptedEpoch:
    """What a mid-epoch checkpoint holds of the epoch: every rank's progress and RNG streams
    (gathered to all ranks; rank 0 writes them), and the epoch's measurements so far."""
    ranks = comm.all_gather_object({"progress": asdict(done), "rng": capture_rng_state()})
    step = 1 + max(rank["progress"]["iterations"] for rank in ranks)
    return InterruptedEpoch(step, dict(metrics), reclustered, ranks)


def record_bad_images(state: RunState, found: dict[int, str], comm: Comm) -> None:
    """Add the unreadable images every rank has met to the run state (the same on all ranks);
    only the new ones travel."""
    new = {index: reason for index, reason in found.items() if index not in state.bad_images}
    for part in comm.all_gather_object(new):
        state.bad_images.update(part)


def class_probe(shard: ShardFeatures, targets: np.ndarray, cfg: Config, epoch: int, comm: Comm,
                device: torch.device) -> dict[str, float]:
    """k-means with k = number of classes on this epoch's features (centred, L2-normalised,
    not whitened: whitening lifts noise directions to unit variance), scored against the
    classes. A label-free measure of feature quality that, unlike NMI of the pseudo-labels,
    does not depend on k. Sharded k-means, so the raw features stay on their ranks."""
    x = rows_of(shard.features, row_layout(shard.features, comm))
    x = l2_normalize(x - global_mean(x, comm))
    n_classes = int(targets.max()) + 1
    km = sharded_kmeans(x, n_classes, seed=derived_seed(cfg.seed, epoch, "probe"),
                        niter=cfg.clustering.niter, comm=comm,
                        gpu=own_gpu(device, cfg.clustering.device))
    pred = spread_labels(km.labels, shard.indices, len(targets), comm)
    keep = pred >= 0
    return {"probe_nmi": nmi(pred[keep], targets[keep]),
            "probe_acc": clustering_accuracy(pred[keep], targets[keep])}


def finish_plots(cfg: Config, run: RunDir, state: RunState, tracker) -> None:
    if not cfg.tracking.plots or not state.history:
        return
    curves = plot_nmi_curves(state.history, run.plots / "nmi_curves.png")
    sizes = plot_cluster_sizes(np.bincount(state.labels[state.labels >= 0],
                                           minlength=state.n_clusters),
                               run.plots / "cluster_sizes.png")
    for path in (curves, sizes):
        tracker.log_artifact(path)
