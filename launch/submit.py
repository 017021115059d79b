"""Build the submitit executor from the config's `slurm:` section and submit a TrainJob.

One task per GPU (or `slurm.tasks_per_node` CPU tasks where there are none); the processes
find each other from Slurm's environment (dcluster.parallel.distributed). Everything `train`
checks before computing is checked here, before anything is queued (the data-dependent checks
where the data is reachable), and the run directory is prepared, so a config error or a clash
with another run's directory is reported at once rather than hours later when the job starts.
A dry run needs no data: it prints the script, the resolved config and what it could not check.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import submitit
from submitit import SlurmExecutor

from dcluster.core.batch import plan_batch
from dcluster.core.config import SlurmConfig, to_yaml, unreachable_paths
from dcluster.methods import METHODS, Config, load_config
from dcluster.core.rundir import prepare_run_dir
from dcluster.harness import preflight
from launch.job import EvalJob, TrainJob

log = logging.getLogger("dcluster.launch")


@dataclass
class Submission:
    job_id: str
    log_dir: Path
    run_dir: Path


def tasks_per_node(slurm: SlurmConfig) -> int:
    return slurm.gpus_per_node if slurm.gpus_per_node > 0 else slurm.tasks_per_node


# CPUs a task needs besides its decoding workers: the training loop, and one for the threads
# NCCL, DALI and the checkpoint writer start of their own
EXTRA_CPUS = 2


def cpus_per_task(cfg: Config) -> int:
    """slurm.cpus_per_task, or where it is 0 the rule: data.workers + EXTRA_CPUS."""
    return cfg.slurm.cpus_per_task or cfg.data.workers + EXTRA_CPUS


def srun_args(cpus: int) -> list[str]:
    """Options the srun of the job step needs spelled out: Slurm 22.05 to 23.02 do not pass
    sbatch's --cpus-per-task on to srun (each task would get one CPU, and the data loading
    and torch threads would share it), and --kill-on-bad-exit=1 ends the step when one task
    fails instead of leaving the others blocked in a collective until the timeout."""
    return [f"--cpus-per-task={cpus}", "--kill-on-bad-exit=1"]


def build_executor(cfg: Config, log_dir: Path, cluster: Optional[str] = None) -> submitit.AutoExecutor:
    """An AutoExecutor for the run; `cluster="slurm"` forces the Slurm backend (for
    --dry-run on a machine without sbatch)."""
    s = cfg.slurm
    executor = submitit.AutoExecutor(folder=str(log_dir), cluster=cluster,
                                     slurm_max_num_timeout=s.max_requeues)
    params = dict(
        name=s.job_name or cfg.name, nodes=s.nodes, tasks_per_node=tasks_per_node(s),
        cpus_per_task=cpus_per_task(cfg), timeout_min=s.time_min,
        slurm_signal_delay_s=s.signal_delay_s, slurm_srun_args=srun_args(cpus_per_task(cfg)),
    )
    if s.gpus_per_node > 0:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb > 0:
        params["mem_gb"] = s.mem_gb
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    executor.update_parameters(**params)
    return executor


@contextmanager
def _slurm_commands_optional() -> Iterator[None]:
    """submitit refuses to build a Slurm executor where ``srun`` is not on PATH, though
    writing the script needs no Slurm: for a dry run (a laptop preparing a job) that check is
    lifted, and put back on exit."""
    check = SlurmExecutor.__dict__["affinity"]
    SlurmExecutor.affinity = classmethod(lambda cls: 1)  # type: ignore[method-assign]
    try:
        yield
    finally:
        SlurmExecutor.affinity = check  # type: ignore[method-assign]


def sbatch_script(executor: submitit.AutoExecutor) -> str:
    """The sbatch file submitit would write. submitit has no public call for it: this uses
    its SlurmExecutor's own text builder, so the output is exactly what would be queued."""
    slurm_executor = executor._executor  # pylint: disable=protected-access
    return slurm_executor._make_submission_file_text(  # pylint: disable=protected-access
        slurm_executor._submitit_command_str, "dry-run")  # pylint: disable=protected-access


def world_size(slurm: SlurmConfig) -> int:
    return slurm.nodes * tasks_per_node(slurm)


def checked_before_queueing(cfg: Config) -> list[str]:
    """Run `train`'s checks that need the data and the job's size where the data is reachable
    (a ConfigError names what fails); return what could not be checked from this machine."""
    missing = unreachable_paths(cfg)
    unchecked = [f"{name} {path}: not reachable from here (its existence, the image count "
                 "against clustering.k / mmdc.k, its files)" for name, path in missing]
    if not any(name == "data.path" for name, _ in missing):
        preflight(cfg, METHODS[cfg.method].build, world_size(cfg.slurm))
    else:
        plan_batch(cfg.optim, world_size(cfg.slurm))
    unchecked.append("the nodes' GPUs against the installed torch/FAISS builds: checked when "
                     "the job starts (exit 2 there)")
    return unchecked


def dry_run_text(cfg: Config, script: str, unchecked: list[str], source: str) -> str:
    """What `submit --dry-run` prints: the script, the config the job will run (``source``:
    where it comes from), the gaps."""
    return "\n".join([
        "# ---- sbatch script ----", script.rstrip(),
        f"# ---- resolved config ({source}) ----", to_yaml(cfg).rstrip(),
        "# ---- not checked on this machine ----", *(f"# - {item}" for item in unchecked)])


def submit(config_path: str, overrides: Sequence[str], dry_run: bool = False) -> Submission | str:
    cfg = load_config(config_path, overrides, check_paths=not dry_run)
    unchecked = checked_before_queueing(cfg)
    run_dir = Path(cfg.runs_root) / cfg.name
    log_dir = Path(cfg.slurm.log_dir) if cfg.slurm.log_dir else run_dir / "slurm"
    if dry_run:
        with _slurm_commands_optional():
            script = sbatch_script(build_executor(cfg, log_dir, cluster="slurm"))
        return dry_run_text(cfg, script, unchecked,
                            f"the job's {run_dir}/config.yaml")
    run = prepare_run_dir(cfg)
    executor = build_executor(cfg, log_dir.resolve())
    # absolute paths: the job may start in another working directory
    job = executor.submit(TrainJob(str(Path(config_path).resolve()),
                                   [*overrides, f"runs_root={Path(cfg.runs_root).resolve()}",
                                    f"data.path={Path(cfg.data.path).resolve()}"]))
    log.info("submitted job %s (%d node(s) x %d task(s))", job.job_id, cfg.slurm.nodes,
             tasks_per_node(cfg.slurm))
    return Submission(job_id=str(job.job_id), log_dir=log_dir.resolve(), run_dir=run.root)


def submit_eval(protocol: str, target: str, overrides: Sequence[str],
                dry_run: bool = False) -> Submission | str:
    """Queue `dcluster eval PROTOCOL TARGET` with the Slurm settings of the target's config
    (its run's config.yaml, the overrides on top); the target, its config and checkpoint are
    read here first, so that a wrong one is refused before anything is queued."""
    from dcluster.evaluation.target import resolve_target

    resolved = resolve_target(target, overrides, METHODS, Config)
    cfg = resolved.cfg
    home = resolved.run_dir if resolved.run_dir is not None else Path(cfg.runs_root) / cfg.name
    log_dir = Path(cfg.slurm.log_dir) if cfg.slurm.log_dir else home / "slurm"
    if dry_run:
        with _slurm_commands_optional():
            script = sbatch_script(build_executor(cfg, log_dir, cluster="slurm"))
        return dry_run_text(cfg, script, ["the splits and their images: read when the job "
                                          "starts"], f"what the evaluation reads: {target}'s "
                            f"config{' with the overrides' if overrides else ''}")
    executor = build_executor(cfg, log_dir.resolve())
    job = executor.submit(EvalJob(protocol, str(Path(target).resolve()), overrides))
    log.info("submitted eval %s job %s (%d node(s) x %d task(s))", protocol, job.job_id,
             cfg.slurm.nodes, tasks_per_node(cfg.slurm))
    return Submission(job_id=str(job.job_id), log_dir=log_dir.resolve(), run_dir=home.resolve())
