"""The run harness: what a training run does whatever its method (DeepCluster, MMDC,
DeepCluster-v2).

It owns the run directory, the data, resuming (newest valid checkpoint, a named one, or
never), the RNG streams, the epoch's stages with their stop points and checkpoints, the epoch
report with MLflow and the plots. A method (the `Method` protocol) is built from a
:class:`RunContext`, names its stateful objects (written to and restored from the checkpoint
through one mapping, run_state.py), declares its epoch as stages (stages.py) and what its
epochs measure (metric_spec.py); it holds no resume code.

    resume -> for each epoch: seed its streams -> run its stages (EpochRunner) -> report
           -> checkpoint

A stop signal (stop.py) is acted on where all ranks agree: between the steps before an
epoch's first pass, and when a pass starts and after any of its training iterations, with a
checkpoint of exactly where the epoch stands (EpochRunner).
"""
from __future__ import annotations

import logging
import signal
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from dcluster.runtime.checkpoint import (SHARD_FILES, CheckpointError, capture_rng_state, checkpoint_name,
                                 keep_as_best, load_checkpoint, load_latest, restore_rng_state,
                                 save_checkpoint, save_shard, shard_path)
from dcluster.parallel.collectives import Comm
from dcluster.core.config import Config
from dcluster.core.batch import plan_batch
from dcluster.core.config_settings import hashed_settings, settings_hash
from dcluster.data import ImageSource, build_pipelines, open_source
from dcluster.parallel.distributed import Env
from dcluster.reporting.epoch_report import assignment_metrics, format_epoch_line
from dcluster.core.errors import CleanStop
from dcluster.parallel.hardware import set_torch_threads
from dcluster.parallel.execution import execution_for
from dcluster.evaluation.monitor import DECLARED as MONITORED
from dcluster.evaluation.monitor import Monitor, is_best_epoch, monitored
from dcluster.runtime.optimize import (EpochProgress, Pause, StepLoop, align_replicas, pass_loss,
                                      pass_totals)
from dcluster.runtime.passes import run_pass
from dcluster.core.rundir import RunDir, attach_log_file, prepare_run_dir, save_assignments
from dcluster.runtime.run_state import (FORMAT_VERSION, Clusters, InterruptedEpoch, RunProgress,
                                Stateful, check_compatible, check_global_batch, restore_objects, sharded_objects,
                                upgraded)
from dcluster.core.seeding import derived_seed, seed_everything
from dcluster.runtime.stages import Epoch, Pass, Step
from dcluster.runtime.context import Method, RunContext, timed
from dcluster.runtime.stop import StopPoints, StopRequest, TrainingStopped
from dcluster.reporting.telemetry import speed_metrics
from dcluster.reporting.mlflow_store import tracking_uri
from dcluster.reporting.tracking import RunTracker, make_tracker

log = logging.getLogger("dcluster.harness")


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Optional[Path]
    mlflow_uri: Optional[str]
    mlflow_run_id: Optional[str]
    history: list[dict[str, float]]  # rank 0's is the run's (other ranks skip the reports)
    rank: int = 0  # of the process that returns it: rank 0 alone speaks for the run


class EpochRunner:
    """Runs an epoch's stages (stages.py), or the rest of an interrupted one, and owns its
    resume: it skips the stages the interrupted epoch had finished, gives its pass back the
    position every rank had, and acts on stop signals and periodic checkpoints

    - between two steps while no pass of the epoch has trained (nothing of the epoch is worth
      keeping yet): on a stop, the epoch-start checkpoint, and the epoch is redone;
    - when a pass starts and after any of its iterations (the StepLoop's poll): a checkpoint
      of exactly where the epoch stands (InterruptedEpoch: the pass's index among the
      epoch's passes, the iterations of the passes before it, the metrics so far, and every
      rank's position, RNG streams and BatchNorm buffers), then a stop or on.

    After the epoch's last pass every rank's model is made rank 0's (align_replicas)."""

    def __init__(self, ctx: RunContext, method: Method, checkpointer: Checkpointer) -> None:
        self.ctx, self.method, self.checkpointer = ctx, method, checkpointer

    def run(self, number: int, resumed: Optional[InterruptedEpoch]) -> dict[str, float]:
        """Epoch ``number`` (from where ``resumed`` stands, if given): its metrics."""
        epoch = Epoch(number, dict(resumed.metrics) if resumed else {})
        stages = self.method.stages(epoch)
        for stage in stages:  # every step's time is reported, 0 where it was skipped
            if isinstance(stage, Step) and stage.timer:
                epoch.metrics.setdefault(stage.timer, 0.0)
        passes = [stage for stage in stages if isinstance(stage, Pass)]
        due = [stage for stage in stages if not stage.skip]
        resume_in = passes[resumed.stage] if resumed else None
        if resume_in is not None:  # the stages before the pass it stopped in are done
            due = due[due.index(resume_in):]
        last_pass = next((stage for stage in reversed(due) if isinstance(stage, Pass)), None)
        offset = resumed.offset if resumed else 0
        trained = False  # once a pass has run, the epoch is worth keeping
        for stage, following in zip(due, [*due[1:], None]):
            if isinstance(stage, Step):
                with timed(epoch.metrics, stage.timer) if stage.timer else nullcontext():
                    stage.run()
                if isinstance(following, Step) and not trained:
                    self.stop_point(number)
                continue
            done = resumed.progress(self.ctx.comm.rank) if resumed and stage is resume_in \
                else EpochProgress()
            self.train_pass(epoch, stage, passes.index(stage), done, offset)
            trained = True
            offset += int(self.ctx.comm.all_reduce_max(np.array([done.iterations]))[0])
            if stage is last_pass:
                align_replicas(self.method.model, self.ctx.comm)
        return epoch.metrics

    def stop_point(self, epoch: int) -> None:
        """Between steps: on an agreed stop signal, stop with the epoch-start checkpoint."""
        signum = self.ctx.stops.agreed_stop()
        if signum:
            self.checkpointer.stop(signum, epoch)

    def train_pass(self, epoch: Epoch, stage: Pass, index: int, done: EpochProgress,
                   offset: int) -> None:
        """Run ``stage`` from ``done`` to its end: at each pause the epoch is checkpointed
        where it stands, and on a stop signal the run stops there. Its mean loss goes into the
        epoch's metrics, and its images and time waiting for data for the telemetry."""
        ctx, metrics, checkpointer = self.ctx, epoch.metrics, self.checkpointer
        plan = stage.plan()
        with plan.during or nullcontext():

            def timed_train() -> Optional[Pause]:
                waited = ctx.steps.data_wait_s
                with timed(metrics, "time_training"):
                    pause = run_pass(ctx.steps, ctx.pipelines, plan, stage.name, epoch.number,
                                     ctx.batch.per_process, done)
                metrics["time_data_wait"] = (metrics.get("time_data_wait", 0.0)
                                             + ctx.steps.data_wait_s - waited)
                return pause

            pause = timed_train()
            while pause is not None:
                where = checkpointer.snapshot(done, metrics, index, offset)
                step = checkpoint_step(where)
                if pause.signum:
                    checkpointer.stop(pause.signum, epoch.number, step, where,
                                      offset + done.iterations)
                checkpointer.save(epoch.number, step, where)
                pause = timed_train()
            # the whole pass's: ``done`` and the times carry over a resume
            metrics["images_trained"] = metrics.get("images_trained", 0.0) + done.images
        if plan.finish is not None:
            plan.finish(pass_totals(done, plan.tallies, ctx.comm))
        metrics[stage.loss] = pass_loss(done, ctx.comm)


@dataclass
class Saved:
    """A checkpoint of this run: (epoch, step) as checkpoint_name numbers it; its path on
    rank 0 (which writes it), None elsewhere."""
    epoch: int
    step: int
    path: Optional[Path]


class Checkpointer:
    """Writes the run state as checkpoints (rank 0; every rank waits for it), and knows the
    newest one of this run, so that a second stop where the run resumed writes nothing."""

    def __init__(self, ctx: RunContext, method: Method, progress: RunProgress,
                 objects: dict[str, Stateful], settings: dict[str, Any], fingerprint: str,
                 resumed_from: Optional[Path]) -> None:
        self.ctx, self.method, self.progress, self.objects = ctx, method, progress, objects
        self.settings, self.fingerprint = settings, fingerprint
        self.last: Optional[Saved] = None
        if resumed_from is not None:
            in_epoch = progress.in_epoch
            self.last = Saved(progress.next_epoch, checkpoint_step(in_epoch) if in_epoch else 0,
                              resumed_from)

    @property
    def last_path(self) -> Optional[Path]:
        return self.last.path if self.last else None

    def save(self, epoch: int, step: int = 0, in_epoch: Optional[InterruptedEpoch] = None) -> None:
        """Commit the run state as checkpoint (epoch, step); nothing if it already is."""
        if self.last and (self.last.epoch, self.last.step) == (epoch, step):
            return
        ctx = self.ctx
        shards = self.write_shards(ctx.run.checkpoints / checkpoint_name(epoch, step))
        path = None
        if ctx.comm.is_main:
            path = save_checkpoint(ctx.run.checkpoints,
                                   self.payload(epoch, step, in_epoch, shards),
                                   epoch=epoch, iteration=step,
                                   keep_last=ctx.cfg.checkpoint.keep_last)
            if step == 0 and is_best_epoch(ctx.cfg, self.progress.history, epoch,
                                           (*MONITORED, *self.method.metrics)):
                keep_as_best(path)
        ctx.comm.barrier()
        ctx.stops.saved()
        self.last = Saved(epoch, step, path)

    def write_shards(self, checkpoint: Path) -> dict[str, list[dict[str, Any]]]:
        """Every rank writes its part of each sharded object (the feature bank) beside the
        checkpoint about to be committed; what each rank wrote, by object, in rank order (a
        collective: a rank returns only once every shard is complete)."""
        rank = self.ctx.comm.rank
        return {name: self.ctx.comm.all_gather_object(
                    save_shard(shard_path(checkpoint, name, rank), obj.shard_state()))
                for name, obj in sharded_objects(self.objects).items()}

    def stop(self, signum: int, epoch: int, step: int = 0,
             in_epoch: Optional[InterruptedEpoch] = None, iterations: int = 0) -> None:
        """Checkpoint (epoch, step) and stop the run: raises TrainingStopped."""
        self.save(epoch, step, in_epoch)
        raise TrainingStopped(signum, self.last_path, epoch, iterations)

    def snapshot(self, done: EpochProgress, metrics: dict[str, float], stage: int,
                 offset: int) -> InterruptedEpoch:
        """Where the epoch stands, from every rank (gathered to all; rank 0 writes it): its
        progress in the pass, its RNG streams and its BatchNorm buffers (which a rank updates
        on its own between DDP's synchronisations)."""
        self.method.share_state()
        mine = {"progress": asdict(done), "rng": capture_rng_state(),
                "buffers": {name: buffer.detach().cpu().clone()
                            for name, buffer in self.method.model.named_buffers()}}
        return InterruptedEpoch(stage, offset, dict(metrics),
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
            "global_batch": self.ctx.batch.global_batch,  # what a resume on other GPUs keeps
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


def preflight(cfg: Config, build: type[Method], world_size: int) -> ImageSource:
    """The checks that need the data or the job's size, made before anything is computed: by
    a run at its start, and by `dcluster submit` before it queues one (when the data is
    reachable from there). Returns the opened image source."""
    source = open_source(cfg.data)
    build.check_data(cfg, len(source))
    plan_batch(cfg.optim, world_size)  # refused here if the global batch does not divide
    return source


def run_method(cfg: Config, env: Env, comm: Comm, stop_request: StopRequest,
               build: type[Method]) -> RunResult:
    """One run of the method ``build``, from wherever its run directory stands."""
    source = preflight(cfg, build, comm.world_size)
    run = shared_run_dir(cfg, comm)
    log.info("%s", plan_batch(cfg.optim, comm.world_size).describe())
    set_torch_threads(cfg.threads)
    seed_everything(cfg.seed)
    stops = StopPoints(stop_request, cfg.checkpoint, comm, env.device)
    steps = StepLoop(env.device, cfg.progress, env.is_main, stops, execution_for(cfg, env.device))
    log.info("stop and checkpoint agreement every %d training iteration(s)", stops.poll_every)
    ctx = RunContext(cfg, comm, run, source, build_pipelines(source, cfg.data, cfg.seed),
                     Clusters(), stops, steps)
    method = build(ctx)
    progress = RunProgress()
    objects: dict[str, Stateful] = {"clusters": ctx.clusters, **method.state()}
    if cfg.optim.precision == "fp16":  # the loss scale it has learnt goes on after a resume
        objects["grad_scaler"] = steps.scaler
    settings, fingerprint = hashed_settings(cfg), source.fingerprint()
    resumed_from = resume(ctx, method, progress, objects, settings, fingerprint)
    checkpointer = Checkpointer(ctx, method, progress, objects, settings, fingerprint,
                                resumed_from)
    epochs = EpochRunner(ctx, method, checkpointer)
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
            metrics = epochs.run(epoch, resumed)
            if monitor is not None and monitored(cfg, epoch + 1, method.epochs):
                with timed(metrics, "time_monitor"):
                    metrics.update(monitor.measure(method.model, epoch + 1, env, comm))
                if env.is_main and cfg.tracking.plots:
                    draw_clusters(ctx, tracker, epoch + 1)
            report_epoch(ctx, progress, tracker, epoch, method, metrics)
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
                        checkpointer.last_path or "written by rank 0")
    except BaseException as err:
        # the MLflow run shows why it stopped; a resumed job sets it RUNNING again
        tracker.finish("KILLED" if isinstance(err, (KeyboardInterrupt, CleanStop)) else "FAILED")
        raise
    tracker.finish()
    return RunResult(run_dir=run.root, checkpoint=checkpointer.last_path,
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
    check_compatible(payload, settings, fingerprint, path, type(cfg))
    restore_objects(payload, objects, Path(path))
    method.after_restore()
    restore_rng_state(payload["rng"])
    progress.next_epoch, progress.history = payload["epoch"], list(payload["history"])
    progress.bad_images, progress.mlflow_run_id = dict(payload["bad_images"]), payload["mlflow_run_id"]
    if payload["in_epoch"]:
        progress.in_epoch = InterruptedEpoch(**payload["in_epoch"])
        continue_streams(progress.in_epoch, progress.next_epoch, method.model, ctx.comm, path)
    # after the mid-epoch check, whose refusal of another rank count is the more precise
    check_global_batch(payload, ctx.batch, path)
    if progress.in_epoch is not None:
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


def continue_streams(in_epoch: InterruptedEpoch, epoch: int, model: nn.Module, comm: Comm,
                     source: str) -> None:
    """Give this rank back the RNG streams and BatchNorm buffers it had when an interrupted
    epoch was saved (its dropout masks go on where they stopped). Only with as many ranks as
    wrote it: each rank's position is in its own slice of the epoch's order, and the slices
    depend on their number."""
    saved = len(in_epoch.ranks)
    if saved != comm.world_size:
        raise CheckpointError(
            f"{source}: saved in the middle of epoch {epoch + 1} by {saved} rank(s), "
            f"this run has {comm.world_size}: resume it with {saved}, or pass resume=<an "
            "epoch-boundary checkpoint (ckpt_e*_i0000000.pt)> to redo that epoch")
    mine = in_epoch.ranks[comm.rank]
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
                 method: Method, metrics: dict[str, float]) -> None:
    """The epoch's one line, its MLflow metrics and assignments file (rank 0), and its entry
    in the run's history (every rank). ``epoch`` counts from 0, as Python's loops do; what a
    user reads counts from 1 (the log, MLflow's steps, the history, the file names): epoch
    ``n`` is the n-th, and checkpoint ``ckpt_e<n>`` holds the run after it."""
    record_bad_images(progress, ctx.pipelines.bad_indices, ctx.comm)
    metrics["bad_images"] = float(len(progress.bad_images))
    metrics.update(speed_metrics(metrics, ctx.comm, ctx.device))
    progress.next_epoch = epoch + 1
    clusters = ctx.clusters
    if ctx.comm.is_main:
        if clusters.updated_epoch == epoch:
            metrics.update(assignment_metrics(clusters.labels, clusters.previous_labels,
                                              ctx.source.targets))
        log.info(format_epoch_line(epoch, method.epochs, metrics, method.metrics,
                                   method.scored_at))
        tracker.log_metrics(metrics, step=progress.next_epoch)
        save_assignments(ctx.run, progress.next_epoch, clusters.labels)
    progress.history.append({"epoch": float(progress.next_epoch), **metrics})


def draw_clusters(ctx: RunContext, tracker: RunTracker, epoch: int) -> None:
    """The contact sheet of what the clusters hold after ``epoch`` (from 1), at the monitor's
    epochs: in the run's plots/ and in MLflow."""
    from dcluster.reporting.contact_sheet import contact_sheet, sheet_path

    assert ctx.clusters.labels is not None
    tracker.log_artifact(contact_sheet(ctx.source, ctx.clusters.labels,
                                       sheet_path(ctx.run.plots, epoch), ctx.cfg.seed))


def finish_plots(cfg: Config, run: RunDir, clusters: Clusters, history: list[dict[str, float]],
                 tracker: RunTracker) -> None:
    if not cfg.tracking.plots or not history or clusters.labels is None:
        return
    from dcluster.reporting.plots import (plot_cluster_sizes, plot_monitor_curves,  # matplotlib: 0.6 s
                                plot_nmi_curves, plot_throughput)

    curves = plot_nmi_curves(history, run.plots / "nmi_curves.png")
    sizes = plot_cluster_sizes(clusters.sizes(), run.plots / "cluster_sizes.png")
    speed = plot_throughput(history, run.plots / "throughput.png")
    monitor = ([plot_monitor_curves(history, run.plots / "monitor.png")]
               if cfg.monitor.every else [])
    for path in (curves, sizes, speed, *monitor):
        tracker.log_artifact(path)
