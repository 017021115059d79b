"""Real multi-process jobs for the distributed tests: free ports, ranks as subprocesses (with
torchrun's variables) or spawned functions, always waited for and killed by pid on failure."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.multiprocessing as mp

from dcluster.parallel.collectives import Comm
from dcluster.core.config import DistributedConfig
from dcluster.parallel.distributed import Env, process_group

REPO = Path(__file__).resolve().parent.parent
RANK_MAIN = Path(__file__).resolve().parent / "rank_main.py"
JOB_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankOutcome:
    returncode: int
    output: str


def run_ranks(commands: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], logs: Path,
              timeout: float = JOB_TIMEOUT_S) -> list[RankOutcome]:
    """Start one process per rank, wait for all (at most ``timeout`` seconds in total), kill
    what is left, and return each one's exit code and combined output."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for rank, (command, env) in enumerate(zip(commands, envs)):
            with open(logs / f"rank{rank}.log", "wb") as out:
                procs.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=out,
                                              stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [RankOutcome(p.returncode, (logs / f"rank{r}.log").read_text(errors="replace"))
            for r, p in enumerate(procs)]


def torchrun_env(rank: int, world: int, addr: str, port: int, **extra: str) -> dict[str, str]:
    """The variables torchrun gives each worker (one CPU thread each: two ranks share 2 cores)."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": addr, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **extra}


def rank_command(*args: str) -> list[str]:
    """``python tests/rank_main.py ARGS``: `dcluster` with the test patches of rank_main.py."""
    return [sys.executable, str(RANK_MAIN), *args]


def describe(outcomes: Sequence[RankOutcome], tail: int = 4000) -> str:
    return "\n".join(f"--- rank {r} exited {o.returncode}:\n{o.output[-tail:]}"
                     for r, o in enumerate(outcomes))


def _rank_entry(rank: int, world: int, port: int, fn: Callable[[Comm], None]) -> None:
    env = Env(rank, world, 0, torch.device("cpu"), "test", "127.0.0.1", port)
    torch.set_num_threads(1)
    with process_group(env, DistributedConfig(timeout_s=60)):
        fn(Comm(env))


def spawn_ranks(fn: Callable[[Comm], None], world: int, timeout: float = JOB_TIMEOUT_S) -> None:
    """Run ``fn(comm)`` in ``world`` spawned processes joined by a gloo group; raises if any
    fails or the job outlives ``timeout``. ``fn`` must be importable (module level; use
    functools.partial for arguments), and reports results through files."""
    context = mp.start_processes(_rank_entry, args=(world, free_port(), fn), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        # join returns False each time one rank ends while others still run
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{world} spawned ranks still running after {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
