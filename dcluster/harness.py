"""The run harness: what a training run does whatever its method (DeepCluster, MMDC).

It owns the run directory, the data, resuming (newest valid checkpoint, a named one, or
never), the RNG streams, the stop points and the checkpoints, the epoch report with MLflow
and the plots. A method (the `Method` protocol) owns only its epoch: it is built from a
:class:`RunContext`, names its stateful objects (written to and restored from the checkpoint
through one mapping, run_state.py) and runs one epoch, or the rest of one that a mid-epoch
checkpoint interrupted.

    resume -> for each epoch: seed its streams -> method.run_epoch -> report -> checkpoint

A stop signal (stop.py) is acted on where all ranks agree: at the stage boundaries a method
marks (:meth:`RunContext.stop_point`) and after any training iteration of a pass run through
:meth:`RunContext.train_pass`, with a checkpoint of exactly where the epoch stands.
"""
from __future__ import annotations

import logging
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from torch import nn

from dcluster.checkpoint import (SHARD_FILES, CheckpointError, capture_rng_state, checkpoint_name,
                                 keep_as_best, load_checkpoint, load_latest, restore_rng_state,
                                 save_checkpoint, save_shard, shard_path)
from dcluster.collectives import Comm
from dcluster.config import Config
from dcluster.config_settings import hashed_settings, settings_hash
from dcluster.data import ImageSource, Pipelines, build_pipelines, open_source
from dcluster.distributed import Env
from dcluster.epoch_report import assignment_metrics, format_epoch_line
from dcluster.errors import CleanStop
from dcluster.hardware import set_torch_threads
from dcluster.execution import Execution, execution_for
from dcluster.monitor import Monitor, is_best_epoch, monitored
from dcluster.optimize import EpochProgress, Pause, StepLoop
from dcluster.rundir import RunDir, attach_log_file, prepare_run_dir, save_assignments
from dcluster.run_state import (FORMAT_VERSION, Clusters, InterruptedEpoch, RunProgress,
                                Stateful, check_compatible, restore_objects, sharded_objects,
                                upgraded)
from dcluster.seeding import derived_seed, seed_everything
from dcluster.stop import StopPoints, StopRequest, TrainingStopped
from dcluster.telemetry import speed_metrics
from dcluster.tracking import RunTracker, make_tracker, tracking_uri

log = logging.getLogger("dcluster.harness")


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Optional[Path]
    mlflow_uri: Optional[str]
    mlflow_run_id: Optional[str]
    history: list[dict[str, float]]  # rank 0's is the run's (other ranks skip the reports)
    rank: int = 0  # of the process that returns it: rank 0 alone speaks for the run


class Method(Protocol):
    """A training method on the harness; built as ``Method(ctx)``."""
    model: nn.Module  # the network: its buffers are saved per rank in mid-epoch checkpoints
    epochs: int  # the epochs of a whole run
    scored_at: str  # which network the epoch's cluster scores measure (epoch_report.SCORED_AT)

    @staticmethod
    def check_data(cfg: Config, n_images: int) -> None:
        """Raise ConfigError for settings the number of images rules out (k above it): called
        once the image list is known, before the run directory is made or an image decoded."""

    def state(self) -> dict[str, Stateful]:
        """The method's objects by checkpoint name, in the order a restore loads them."""

    def after_restore(self) -> None:
        """Called once the checkpoint's state is loaded (DeepCluster re-wraps DDP for the
        restored head)."""

    def share_state(self) -> None:
        """Called on every rank before a mid-epoch checkpoint: make what rank 0 writes hold
        every rank's part (MMDC's targets are updated by each rank for its own images), and
        what each rank writes to its shard files its own (DeepCluster's feature bank rows go
        to the ranks that own them)."""

    def run_epoch(self, epoch: int, resumed: Optional[InterruptedEpoch]) -> dict[str, float]:
        """Epoch ``epoch`` (from where ``resumed`` stands, if given): its metrics."""


@dataclass
class RunContext:
    """What a method's epoch works with, and the harness's services to it."""
    cfg: Config
    env: Env
    comm: Comm
    run: RunDir
    source: ImageSource
    pipelines: Pipelines
    clusters: Clusters  # set by the method, reported and checkpointed by the harness
    stops: StopPoints
    steps: StepLoop  # the optimisation loop of every training pass
    checkpointer: Optional[Checkpointer] = None  # set by the harness once the state is known

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def execution(self) -> Execution:
        """How the passes run on this rank's device (precision, memory format)."""
        assert self.steps.execution is not None
        return self.steps.execution

    @property
    def show(self) -> bool:
        """Progress bars and epoch lines: rank 0 only."""
        return self.env.is_main

    def stop_point(self, epoch: int) -> None:
        """A stage boundary where nothing of the epoch is worth keeping yet (after the
        feature pass, say): on an agreed stop signal, stop with the epoch-start checkpoint."""
        signum = self.stops.agreed_stop()
        if signum:
            assert self.checkpointer is not None
            self.checkpointer.stop(signum, epoch)

    def train_pass(self, epoch: int, run: Callable[[], Optional[Pause]], done: EpochProgress,
                   metrics: dict[str, float], stage: int = 0, offset: int = 0,
                   **extra: Any) -> None:
        """Run a pausable training pass to its end: ``run()`` trains from ``done.position``
        (StepLoop.run); at each pause the epoch is checkpointed where it stands, and on a stop
        signal the run stops there. ``stage``, ``offset``, ``metrics`` and ``extra`` are what a
        resume needs to continue the epoch (InterruptedEpoch). The pass's images and its
        time waiting for data are added to ``metrics`` for the telemetry."""
        assert self.checkpointer is not None

        def timed_run() -> Optional[Pause]:
            waited = self.steps.data_wait_s
            with timed(metrics, "time_training"):
                pause = run()
            metrics["time_data_wait"] = (metrics.get("time_data_wait", 0.0)
                                         + self.steps.data_wait_s - waited)
            return pause

        pause = timed_run()
        while pause is not None:
            where = self.checkpointer.snapshot(done, metrics, stage, offset, extra)
            step = checkpoint_step(where)
            if pause.signum:
                self.checkpointer.stop(pause.signum, epoch, step, where, offset + done.iterations)
            self.checkpointer.save(epoch, step, where)
            pause = timed_run()
        # the whole pass's: ``done`` and the times carry over a resume
        metrics["images_trained"] = metrics.get("images_trained", 0.0) + done.images


@contextmanager
def timed(metrics: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall time to ``metrics[key]`` (a stage paused and resumed adds up)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - start


class Checkpointer:
    """Writes the run state as checkpoints (rank 0; every rank waits for it), and knows the
    newest one of this run, so that a second stop where the run resumed writes nothing."""

    def __init__(self, ctx: RunContext, method: Method, progress: RunProgress,
                 objects: dict[str, Stateful], settings: dict[str, Any], fingerprint: str,
                 resumed_from: Optional[Path]) -> None:
        self.ctx, self.method, self.progress, self.objects = ctx, method, progress, objects
        self.settings, self.fingerprint = settings, fingerprint
        self.last = resumed_from
        self.saved_at: Optional[tuple[int, int]] = None
        if resumed_from is not None:
            in_epoch = progress.in_epoch
            self.saved_at = (progress.next_epoch, checkpoint_step(in_epoch) if in_epoch else 0)

    def save(self, epoch: int, step: int = 0, in_epoch: Optional[InterruptedEpoch] = None) -> None:
        """Commit the run state as checkpoint (epoch, step); nothing if it already is."""
        if self.saved_at == (epoch, step):
            return
        ctx = self.ctx
        shards = self.write_shards(ctx.run.checkpoints / checkpoint_name(epoch, step))
        if ctx.env.is_main:
            self.last = save_checkpoint(ctx.run.checkpoints,
                                        self.payload(epoch, step, in_epoch, shards),
                                        epoch=epoch, iteration=step,
                                        keep_last=ctx.cfg.checkpoint.keep_last)
            if step == 0 and is_best_epoch(ctx.cfg, self.progress.history, epoch):
                keep_as_best(self.last)
        ctx.comm.barrier()
        ctx.stops.saved()
        self.saved_at = (epoch, step)

    def write_shards(self, checkpoint: Path) -> dict[str, list[dict[str, Any]]]:
        """Every rank writes its part of each sharded object (the feature bank) beside the
        checkpoint about to be committed; what each rank wrote, by object, in rank order (a
        collective: a rank returns only once every shard is complete)."""
        rank = self.ctx.env.rank
        return {name: self.ctx.comm.all_gather_object(
                    save_shard(shard_path(checkpoint, name, rank), obj.shard_state()))
                for name, obj in sharded_objects(self.objects).items()}

    def stop(self, signum: int, epoch: int, step: int = 0,
             in_epoch: Optional[InterruptedEpoch] = None, iterations: int = 0) -> None:
        """Checkpoint (epoch, step) and stop the run: raises TrainingStopped."""
        self.save(epoch, step, in_epoch)
        raise TrainingStopped(signum, self.last, epoch, iterations)

    def snapshot(self, done: EpochProgress, metrics: dict[str, float], stage: int, offset: int,
                 extra: dict[str, Any]) -> InterruptedEpoch:
        """Where the epoch stands, from every rank (gathered to all; rank 0 writes it): its
        progress in the pass, its RNG streams and its BatchNorm buffers (which a rank updates
        on its own between DDP's synchronisations)."""
        self.method.share_state()
        mine = {"progress": asdict(done), "rng": capture_rng_state(),
                "buffers": {name: buffer.detach().cpu().clone()
                            for name, buffer in self.method.model.named_buffers()}}
        return InterruptedEpoch(stage, offset, dict(metrics), dict(extra),
                                self.ctx.comm.all_gather_object(mine))

    def payload(self, epoch: int, step: int, in_epoch: Optional[InterruptedEpoch],
                shards: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        progress = self.progress
        return {
            "format": FORMAT_VERSION,
            "method": self.ctx.cfg.method,
            "config_hash": settings_hash(self.settings),
            "settings": self.settings,  # what a newer dcluster compares key by key
            "data_fingerprint": self.fingerprint,
            "epoch": epoch,
            "iteration": step,
            "in_epoch": asdict(in_epoch) if in_epoch else None,
            "history": list(progress.history),
            "bad_images": dict(progress.bad_images),
            "mlflow_run_id": progress.mlflow_run_id,
            **{name: obj.state_dict() for name, obj in self.objects.items() if name not in shards},
            **{name: {**self.objects[name].state_dict(), "shards": files}
               for name, files in shards.items()},
            **({SHARD_FILES: [described for files in shards.values() for described in files]}
               if shards else {}),
            "rng": capture_rng_state(),  # last, after everything else is decided
        }


def checkpoint_step(in_epoch: InterruptedEpoch) -> int:
    """The ``iteration`` of the checkpoint that holds ``in_epoch`` (see InterruptedEpoch)."""
    return 1 + in_epoch.offset + max(rank["progress"]["iterations"] for rank in in_epoch.ranks)


def run_method(cfg: Config, env: Env, comm: Comm, stop_request: StopRequest,
               build: type[Method]) -> RunResult:
    """One run of the method ``build``, from wherever its run directory stands."""
    source = open_source(cfg.data)
    build.check_data(cfg, len(source))
    run = shared_run_dir(cfg, comm)
    set_torch_threads(cfg.threads)
    seed_everything(cfg.seed)
    stops = StopPoints(stop_request, cfg.checkpoint, comm, env.device)
    steps = StepLoop(env.device, cfg.progress, env.is_main, stops, execution_for(cfg, env.device))
    log.info("stop and checkpoint agreement every %d training iteration(s)", stops.poll_every)
    ctx = RunContext(cfg, env, comm, run, source, build_pipelines(source, cfg.data, cfg.seed),
                     Clusters(), stops, steps)
    method = build(ctx)
    progress = RunProgress()
    objects: dict[str, Stateful] = {"clusters": ctx.clusters, **method.state()}
    if cfg.optim.precision == "fp16":  # the loss scale it has learnt goes on after a resume
        objects["grad_scaler"] = steps.scaler
    settings, fingerprint = hashed_settings(cfg), source.fingerprint()
    resumed_from = resume(ctx, method, progress, objects, settings, fingerprint)
    ctx.checkpointer = checkpointer = Checkpointer(ctx, method, progress, objects, settings,
                                                   fingerprint, resumed_from)
    monitor = Monitor(cfg, source, ctx.pipelines) if cfg.monitor.every else None
    tracker = make_tracker(cfg, env.is_main)
    progress.mlflow_run_id = tracker.start(cfg, run, progress.mlflow_run_id,
                                           progress.history)
    try:
        for epoch in range(progress.next_epoch, method.epochs):
            resumed, progress.in_epoch = progress.in_epoch, None
            if resumed is None:
                # dropout and any other draw from torch's global generator: a (seed, epoch,
                # rank) stream, so ranks differ and a redone epoch repeats itself (an
                # interrupted one continues the stream it saved)
                torch.manual_seed(derived_seed(cfg.seed, epoch, "dropout", env.rank))
            metrics = method.run_epoch(epoch, resumed)
            if monitor is not None and monitored(cfg, epoch + 1, method.epochs):
                with timed(metrics, "time_monitor"):
                    metrics.update(monitor.measure(method.model, epoch + 1, env, comm))
            report_epoch(ctx, progress, tracker, epoch, method.epochs, metrics, method.scored_at)
            if progress.next_epoch % cfg.checkpoint.interval == 0 or progress.next_epoch == method.epochs:
                checkpointer.save(progress.next_epoch)
        if env.is_main:
            finish_plots(cfg, run, ctx.clusters, progress.history, tracker)
        # no rank reports success before rank 0's last checkpoint and plots are written
        comm.barrier()
        if stop_request.signum:  # it came after the last stop point: nothing is left to stop
            log.warning("received %s after the last epoch's stop point: the run is complete "
                        "(final checkpoint %s), nothing to resume",
                        signal.Signals(stop_request.signum).name,
                        checkpointer.last or "written by rank 0")
    except BaseException as err:
        # the MLflow run shows why it stopped; a resumed job sets it RUNNING again
        tracker.finish("KILLED" if isinstance(err, (KeyboardInterrupt, CleanStop)) else "FAILED")
        raise
    tracker.finish()
    return RunResult(run_dir=run.root, checkpoint=checkpointer.last,
                     mlflow_uri=tracking_uri(cfg) if cfg.tracking.enabled else None,
                     mlflow_run_id=progress.mlflow_run_id, history=progress.history,
                     rank=env.rank)


def shared_run_dir(cfg: Config, comm: Comm) -> RunDir:
    """Rank 0 creates (or checks and reuses) the run directory; the others learn its path once
    it is ready. Every rank appends to its log: rank 0 all records, the others only errors, so
    that a rank's failure is in train.log too."""
    root = comm.broadcast_object(str(prepare_run_dir(cfg).root) if comm.is_main else None)
    run = RunDir(Path(root))
    handler = attach_log_file(run)
    if not comm.is_main:
        handler.setLevel(logging.ERROR)
    return run


def resume(ctx: RunContext, method: Method, progress: RunProgress,
           objects: dict[str, Stateful], settings: dict[str, Any],
           fingerprint: str) -> Optional[Path]:
    """Restore the run state from the checkpoint to continue from, and return its path: the
    newest valid one (resume=auto), the named one (resume=<path>) or none (a new run, or
    resume=never). Rank 0 chooses the file, so that every rank resumes from the same one."""
    cfg, comm = ctx.cfg, ctx.comm
    found = find_resume_checkpoint(cfg, ctx.run) if comm.is_main else None
    path = comm.broadcast_object(str(found[1].resolve()) if found else None)
    if path is None:
        return None
    payload = upgraded(found[0] if found else load_checkpoint(Path(path)))
    check_compatible(payload, settings, fingerprint, path)
    restore_objects(payload, objects, Path(path))
    method.after_restore()
    restore_rng_state(payload["rng"])
    progress.next_epoch, progress.history = payload["epoch"], list(payload["history"])
    progress.bad_images, progress.mlflow_run_id = dict(payload["bad_images"]), payload["mlflow_run_id"]
    if payload["in_epoch"]:
        progress.in_epoch = InterruptedEpoch(**payload["in_epoch"])
        continue_streams(progress.in_epoch, progress.next_epoch, method.model, ctx.env, path)
        step = checkpoint_step(progress.in_epoch)
        log.info("resuming from %s inside epoch %d, after its %s", path, progress.next_epoch + 1,
                 f"iteration {step - 1}" if step > 1 else "clustering")
    else:
        log.info("resuming from %s after epoch %d", path, progress.next_epoch)
    return Path(path)


def find_resume_checkpoint(cfg: Config, run: RunDir) -> Optional[tuple[dict[str, Any], Path]]:
    """The checkpoint a run continues from, with its path: None for resume=never or when none
    is saved yet (resume=auto), else the newest valid one (auto) or the named one."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return load_latest(run.checkpoints, with_shards=True)
    path = Path(cfg.resume)
    return load_checkpoint(path, with_shards=True), path


def continue_streams(in_epoch: InterruptedEpoch, epoch: int, model: nn.Module, env: Env,
                     source: str) -> None:
    """Give this rank back the RNG streams and BatchNorm buffers it had when an interrupted
    epoch was saved (its dropout masks go on where they stopped). Only with as many ranks as
    wrote it: each rank's position is in its own slice of the epoch's order, and the slices
    depend on their number."""
    saved = len(in_epoch.ranks)
    if saved != env.world_size:
        raise CheckpointError(
            f"{source}: saved in the middle of epoch {epoch + 1} by {saved} rank(s), "
            f"this run has {env.world_size}: resume it with {saved}, or pass resume=<an "
            "epoch-boundary checkpoint (ckpt_e*_i0000000.pt)> to redo that epoch")
    mine = in_epoch.ranks[env.rank]
    restore_rng_state(mine["rng"])
    if mine.get("buffers"):
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in mine["buffers"].items():
                buffers[name].copy_(value)


def record_bad_images(progress: RunProgress, found: dict[int, str], comm: Comm) -> None:
    """Add the unreadable images every rank has met to the run state (the same on all ranks);
    only the new ones travel."""
    new = {index: reason for index, reason in found.items() if index not in progress.bad_images}
    for part in comm.all_gather_object(new):
        progress.bad_images.update(part)


def report_epoch(ctx: RunContext, progress: RunProgress, tracker: RunTracker, epoch: int,
                 epochs: int, metrics: dict[str, float], scored_at: str) -> None:
    """The epoch's one line, its MLflow metrics and assignments file (rank 0), and its entry
    in the run's history (every rank). ``epoch`` counts from 0, as Python's loops do; what a
    user reads counts from 1 (the log, MLflow's steps, the history, the file names): epoch
    ``n`` is the n-th, and checkpoint ``ckpt_e<n>`` holds the run after it."""
    record_bad_images(progress, ctx.pipelines.bad_indices, ctx.comm)
    metrics["bad_images"] = float(len(progress.bad_images))
    metrics.update(speed_metrics(metrics, ctx.comm, ctx.device))
    progress.next_epoch = epoch + 1
    clusters = ctx.clusters
    if ctx.env.is_main:
        if clusters.updated_epoch == epoch:
            metrics.update(assignment_metrics(clusters.labels, clusters.previous_labels,
                                              ctx.source.targets))
        log.info(format_epoch_line(epoch, epochs, metrics, scored_at))
        tracker.log_metrics(metrics, step=progress.next_epoch)
        save_assignments(ctx.run, progress.next_epoch, clusters.labels)
    progress.history.append({"epoch": float(progress.next_epoch), **metrics})


def finish_plots(cfg: Config, run: RunDir, clusters: Clusters, history: list[dict[str, float]],
                 tracker: RunTracker) -> None:
    if not cfg.tracking.plots or not history or clusters.labels is None:
        return
    from dcluster.plots import (plot_cluster_sizes, plot_monitor_curves,  # matplotlib: 0.6 s
                                plot_nmi_curves, plot_throughput)

    curves = plot_nmi_curves(history, run.plots / "nmi_curves.png")
    sizes = plot_cluster_sizes(clusters.sizes(), run.plots / "cluster_sizes.png")
    speed = plot_throughput(history, run.plots / "throughput.png")
    monitor = ([plot_monitor_curves(history, run.plots / "monitor.png")]
               if cfg.monitor.every else [])
    for path in (curves, sizes, speed, *monitor):
        tracker.log_artifact(path)
