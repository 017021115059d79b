"""Where this process sits in the job (rank, world size, device) and the process group.

The same `dcluster train` runs as one process on a laptop or as hundreds of GPU processes:
only the launch differs, and this module reads it from the environment, in this order:

1. torchrun: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (rendezvous env://).
2. submitit (SUBMITIT_EXECUTOR is set): its JobEnvironment, whichever cluster it runs on.
3. A Slurm srun step: SLURM_PROCID, SLURM_LOCALID, the step's task count and node list. The
   sbatch batch script alone is not a world of many tasks (it is one process that would wait
   for peers that never come), so the srun step markers are required.
4. Otherwise a single process, with no process group at all.

Slurm and submitit do not hand out a rendezvous port: it is derived from the job id and the
restart count, so every task computes the same one without talking, and a requeued job does
not race its previous incarnation's sockets for the old port.
"""
from __future__ import annotations

import gc
import logging
import os
import re
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from dcluster.core.config import ConfigError, DistributedConfig
from dcluster.core.errors import CleanStop, UserError

log = logging.getLogger("dcluster.parallel.distributed")

PORT_BASE = 20000
"""Derived ports lie in [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's ephemeral range
(32768+), where outgoing connections take their local ports."""
PORT_SPAN = 10000


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str = "single"  # torchrun | submitit | slurm | single
    master_addr: str = ""
    master_port: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, MLflow records, plots and progress bars."""
        return self.rank == 0

    @property
    def init_method(self) -> str:
        """torchrun already exports MASTER_ADDR/PORT (env://); the others get them spelled out."""
        if self.launcher == "torchrun":
            return "env://"
        return f"tcp://{self.master_addr}:{self.master_port}"


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list as host names, in order: ``node[01-03,07],gpu-a[1-2]`` ->
    node01 node02 node03 node07 gpu-a1 gpu-a2. Zero padding is kept (the width of each range's
    first bound); several bracket groups in one name expand as a product (``r[1-2]n[1-2]``)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_name(item, nodelist))
    if not hosts:
        raise ValueError(f"empty Slurm node list {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """``text`` cut at the commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for pos, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in Slurm node list {text!r}")
        if char == "," and depth == 0:
            items.append(text[start:pos])
            start = pos + 1
    if depth:
        raise ValueError(f"unbalanced brackets in Slurm node list {text!r}")
    items.append(text[start:])
    return [item for item in items if item]


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _expand_name(name: str, whole: str) -> list[str]:
    if "[" not in name:
        return [name]
    head, _, tail = name.partition("[")
    body, _, rest = tail.partition("]")
    values = []
    for part in body.split(","):
        match = _RANGE.match(part)
        if not match or (match[2] and int(match[2]) < int(match[1])):
            raise ValueError(f"bad range {part!r} in Slurm node list {whole!r}")
        width = len(match[1])
        last = int(match[2]) if match[2] else int(match[1])
        values.extend(f"{n:0{width}d}" for n in range(int(match[1]), last + 1))
    return [expanded for value in values for expanded in _expand_name(head + value + rest, whole)]


def rendezvous_port(job_id: str, restart_count: int) -> int:
    """The port of rank 0's rendezvous for a Slurm/submitit job: the same on every task of one
    run, and one further for each requeue, so a restarted job never meets sockets left by its
    previous run on the old port."""
    return PORT_BASE + (zlib.crc32(job_id.encode()) + restart_count) % PORT_SPAN


def shard_bounds(n: int, world_size: int) -> np.ndarray:
    """Where the global indices 0..n-1 are cut between ranks: rank r owns
    ``range(bounds[r], bounds[r + 1])``. Contiguous and as even as np.array_split (the first
    n % world_size ranks get one more), every index exactly once, no padding. Contiguous so
    that stacking the ranks' rows in rank order puts them in global index order."""
    if n < 0 or world_size < 1:
        raise ValueError(f"cannot split {n} images over {world_size} ranks")
    base, extra = divmod(n, world_size)
    sizes = np.full(world_size, base, dtype=np.int64)
    sizes[:extra] += 1
    return np.concatenate(([0], np.cumsum(sizes)))


def my_indices(n: int, env: Env) -> np.ndarray:
    """The global indices this rank extracts features for (int64)."""
    bounds = shard_bounds(n, env.world_size)
    return np.arange(bounds[env.rank], bounds[env.rank + 1], dtype=np.int64)


def detect_env(environ: Optional[Mapping[str, str]] = None) -> Env:
    """This process's place in the job (see the module docstring for the order). Selects the
    process's CUDA device, so that everything created afterwards (DALI pipelines, FAISS GPU
    resources) lands on it. Does not create the process group: see :func:`process_group`."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = _torchrun(environ)
    elif "SUBMITIT_EXECUTOR" in environ:
        env = _submitit(environ)
    elif "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ:
        env = _slurm_step(environ)
    else:
        env = Env(rank=0, world_size=1, local_rank=0, device=_device(0, environ))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.world_size > 1:
        log.info("%s: rank %d of %d (local rank %d) on %s, rendezvous %s", env.launcher,
                 env.rank, env.world_size, env.local_rank, env.device, env.init_method)
    else:
        log.info("single process (%s) on %s", env.launcher, env.device)
    return env


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except (KeyError, ValueError):
        raise ConfigError(f"environment variable {key}={environ.get(key)!r}: an integer is "
                          "needed to place this process in the distributed job") from None


def _torchrun(environ: Mapping[str, str]) -> Env:
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    local = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
        if missing:
            raise ConfigError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not: "
                              "launch with torchrun, or export the rendezvous address too")
    return _checked(Env(rank, world, local, _device(local, environ), "torchrun",
                        environ.get("MASTER_ADDR", ""), int(environ.get("MASTER_PORT") or 0)))


def _submitit(environ: Mapping[str, str]) -> Env:
    """submitit's own view of the job; imported here because it is an optional dependency."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("SUBMITIT_EXECUTOR is set but submitit cannot be imported; "
                          "pip install submitit, or unset the variable") from None
    job = submitit.JobEnvironment()
    restarts = int(environ.get("SLURM_RESTART_COUNT", "0"))
    return _checked(Env(job.global_rank, job.num_tasks, job.local_rank,
                        _device(job.local_rank, environ),
                        "submitit", job.hostnames[0], rendezvous_port(str(job.job_id), restarts)))


def _slurm_step(environ: Mapping[str, str]) -> Env:
    """An srun step: its own task count and node list (a step may use part of the job's)."""
    world = _int(environ, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ
                 else "SLURM_NTASKS")
    local = _int(environ, "SLURM_LOCALID")
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    port = rendezvous_port(environ.get("SLURM_JOB_ID", ""),
                           int(environ.get("SLURM_RESTART_COUNT", "0")))
    return _checked(Env(_int(environ, "SLURM_PROCID"), world, local, _device(local, environ),
                        "slurm", expand_nodelist(nodes)[0] if world > 1 else "", port))


def _checked(env: Env) -> Env:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise ConfigError(f"{env.launcher} environment gives rank {env.rank} of world size "
                          f"{env.world_size} (local rank {env.local_rank}): not a valid place")
    return env


def _device(local_rank: int, environ: Mapping[str, str]) -> torch.device:
    """One process per GPU: the CPU on a machine without; else the GPU
    :func:`bound_gpu_index` picks among those this process sees."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return torch.device("cpu")
    return torch.device("cuda", bound_gpu_index(local_rank, count, local_world_size(environ),
                                                environ.get("SLURM_DISTRIBUTION", "")))


def local_world_size(environ: Mapping[str, str]) -> int:
    """Processes of the job on this node: torchrun's LOCAL_WORLD_SIZE, or Slurm's tasks on
    this node (SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE, e.g. ``8(x2)``: the first
    count, nodes of a homogeneous job alike); 0 when unknown."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        match = re.match(r"\d+", environ.get(key, ""))
        if match:
            return int(match.group())
    return 0


def bound_gpu_index(local_rank: int, count: int, local_world: int, distribution: str) -> int:
    """Which of the ``count`` GPUs this process sees is its own. The local rank's GPU when
    the node's ``local_world`` processes see all of them; the only one when the launcher
    bound each task to its own. A binding that shows each task a group of the node's GPUs
    (``srun --gpu-bind=closest``: tasks on one socket see its 4 of 8 GPUs) leaves
    ``local_world / count`` tasks per group: Slurm spreads tasks over sockets cyclically
    unless told otherwise (``--distribution``'s second level, SLURM_DISTRIBUTION, default
    ``block:cyclic``), so the group's tasks are every ``groups``-th local rank; with
    ``*:block`` they are consecutive. A pure function (tests/test_distributed.py)."""
    if count == 1:
        return 0
    if local_world <= count:
        if local_rank >= count:
            raise ConfigError(f"local rank {local_rank} but this node shows {count} GPUs: "
                              "launch one process per GPU")
        return local_rank
    if local_world % count:
        raise ConfigError(f"{local_world} tasks on this node but this task sees {count} GPUs, "
                          "not a whole share each: bind one GPU per task (srun "
                          "--gpu-bind=single:1 or map_gpu) or none (--gpu-bind=none)")
    groups = local_world // count
    levels = distribution.split(":")
    cyclic = len(levels) < 2 or not levels[1].startswith("block")
    index = local_rank // groups if cyclic else local_rank % count
    log.info("GPU binding shows this task %d of the node's GPUs for %d tasks: local rank %d "
             "takes visible GPU %d (tasks spread over the groups %s)", count, local_world,
             local_rank, index, "cyclically" if cyclic else "in blocks")
    return index


def backend_for(env: Env, choice: str) -> str:
    """nccl when each process has a GPU, gloo otherwise (``choice`` auto), or as configured."""
    if choice == "auto":
        return "nccl" if env.device.type == "cuda" else "gloo"
    if choice == "nccl" and env.device.type != "cuda":
        raise ConfigError("config key 'distributed.backend' = 'nccl': this process has no GPU; "
                          "use auto or gloo")
    return choice


@contextmanager
def process_group(env: Env, cfg: DistributedConfig) -> Iterator[None]:
    """The job's process group for the duration of the block (none for a single process).

    An exception on this rank is logged as ``rank R failed`` (with its traceback unless it is
    a user error) before it propagates and the process exits non-zero: its peers then fail in
    their next collective, on the closed connection (gloo) or at the collective timeout
    (``cfg.timeout_s``, NCCL's watchdog), so the whole job ends instead of hanging, and the
    failing rank's own error is in the job's log.
    """
    if env.world_size == 1:
        yield
        return
    backend = backend_for(env, cfg.backend)
    problem = gloo_address_problem(env.world_size, os.environ, hostname_address())
    if problem:
        raise ConfigError(problem)
    _label_records(env)
    if not env.is_main:
        # N copies of every progress line help nobody; warnings and errors still show
        logging.getLogger("dcluster").setLevel(logging.WARNING)
    dist.init_process_group(backend, init_method=env.init_method, rank=env.rank,
                            world_size=env.world_size, timeout=timedelta(seconds=cfg.timeout_s),
                            device_id=env.device if backend == "nccl" else None)
    log.info("process group: %s, %d ranks, collective timeout %g s", backend, env.world_size,
             cfg.timeout_s)
    try:
        yield
    except BaseException as err:
        if isinstance(err, CleanStop):  # every rank stopped together: not a failure
            close_process_group()
            raise
        log.error("rank %d of %d failed: %s: %s", env.rank, env.world_size,
                  type(err).__name__, err, exc_info=not isinstance(err, UserError))
        raise  # no destroy_process_group: with peers blocked in a collective it could hang
    close_process_group()


def hostname_address() -> Optional[str]:
    """The address this host's name resolves to (None: it does not resolve)."""
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def gloo_address_problem(world_size: int, environ: Mapping[str, str],
                         address: Optional[str]) -> Optional[str]:
    """Why gloo (the job's own group, or NCCL jobs' gloo side group: collectives.Comm.on_host)
    could not reach the other nodes, or None. Without GLOO_SOCKET_IFNAME gloo binds to the
    address the host name resolves to, and to loopback when it does not resolve (torch's
    ProcessGroupGloo::createDefaultDevice, "Using the loopback address as fallback"); a name
    that resolves to 127.0.1.1, Debian's /etc/hosts default, binds there too. Either way the
    other nodes cannot connect and the job hangs until the collective timeout. Only a job
    over several nodes (more ranks than this node's processes) is checked."""
    if environ.get("GLOO_SOCKET_IFNAME"):
        return None
    local = local_world_size(environ)
    nodes = re.match(r"\d+", environ.get("SLURM_STEP_NUM_NODES")
                     or environ.get("SLURM_NNODES", "") or "")
    multi_node = int(nodes.group()) > 1 if nodes else bool(local) and world_size > local
    if not multi_node:
        return None
    if address is None or address.startswith("127."):
        where = "does not resolve" if address is None else f"resolves to loopback ({address})"
        return (f"this job spans several nodes but this host's name {where}, so gloo (used by "
                "every job, NCCL ones for host-side waits) would bind to loopback and the other "
                "nodes could not reach it: export GLOO_SOCKET_IFNAME=<the interface between "
                "the nodes, e.g. eth0 or ib0> (docs/distributed.md)")
    return None


def close_process_group() -> None:
    """Destroy the process group while the interpreter is fully alive, with every rank done.

    A DDP wrapper sits in a reference cycle, so its reducer (which holds the process group and
    gloo's pending work, tensors with Python references) outlives ``del`` until the cyclic
    collector runs. Left to interpreter finalisation, the group's C++ destructor then meets
    joinable gloo threads or a half-torn-down interpreter and the process dies of SIGABRT
    ("terminate called without an active exception"; pytorch/pytorch#179291, #190489), which
    is what failed a 2-rank test once in a full-suite run. So: collect the cycles, let every
    rank finish its collectives (barrier), then destroy: gloo's worker threads are joined
    here."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def _label_records(env: Env) -> None:
    """Prefix every log message of this process with its rank: the launcher interleaves the
    streams of all ranks into one log."""
    make_record = logging.getLogRecordFactory()
    prefix = f"[rank {env.rank}/{env.world_size}] "

    def labelled(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.msg = prefix + str(record.msg)
        return record

    logging.setLogRecordFactory(labelled)
