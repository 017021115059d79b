"""`dcluster submit CONFIG [overrides] [--nodes N] [--gpus-per-node G] ... [--dry-run]`.

Each flag is a shorthand for a `slurm.*` config override, so a team's defaults can live in the
YAML's `slurm:` section and the command line only says what differs.
"""
from __future__ import annotations

import argparse

FLAGS = {  # flag -> (config key, type, help)
    "--nodes": ("slurm.nodes", int, "nodes"),
    "--gpus-per-node": ("slurm.gpus_per_node", int, "GPUs per node: one task each (0: CPU tasks)"),
    "--tasks-per-node": ("slurm.tasks_per_node", int, "CPU tasks per node when there are no GPUs"),
    "--partition": ("slurm.partition", str, "Slurm partition"),
    "--time": ("slurm.time_min", int, "time limit in minutes"),
    "--account": ("slurm.account", str, "Slurm account"),
    "--qos": ("slurm.qos", str, "quality of service"),
    "--constraint": ("slurm.constraint", str, "node feature constraint"),
    "--mem": ("slurm.mem_gb", int, "memory per node in GB"),
    "--cpus-per-task": ("slurm.cpus_per_task", int, "CPUs per task (default: data.workers + 2)"),
    "--exclude": ("slurm.exclude", str, "hosts to avoid"),
    "--job-name": ("slurm.job_name", str, "job name (default: the run name)"),
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("submit", help="submit a training run to Slurm (submitit)")
    p.add_argument("config", help="YAML preset; its slurm: section holds cluster defaults "
                   "(with --eval: the run directory, checkpoint or config to evaluate)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    for flag, (_, kind, text) in FLAGS.items():
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--eval", choices=("linear", "knn", "clusters"),
                   help="submit `dcluster eval PROTOCOL` of the target instead of training")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    from launch.submit import submit, submit_eval

    overrides = list(args.overrides)
    for flag, (key, _, _) in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.eval:
        result = submit_eval(args.eval, args.config, overrides, dry_run=args.dry_run)
    else:
        result = submit(args.config, overrides, dry_run=args.dry_run)
    if isinstance(result, str):
        print(result)
        return 0
    print(f"job id:        {result.job_id}")
    print(f"Slurm logs:    {result.log_dir}")
    print(f"run directory: {result.run_dir}")
    return 0
