"""What the per-iteration stop poll costs a training step.

The training pass all-reduces three integers after every ``checkpoint.poll_every``-th
iteration (dcluster/runtime/stop.py; every iteration on the CPU, as here), so that a stop signal is
acted on by all ranks after the same iteration. This measures, on W gloo
ranks on this machine, DDP training steps of the demo network (configs/demo.yaml: Sobel
smallconv, width 32, fc 256, batch 16 of 32x32 crops, 30 clusters) inside DDP's join:

* baseline: steps with DDP alone in the join, no poll;
* polled:   the same steps run by the training passes' own loop (optimize.StepLoop), with the
            poll as a second joinable;
* poll:     the poll alone, back to back.

Runs alternate (baseline, polled, baseline, polled, ...) and the medians are compared, so
load from elsewhere hits both alike. The demo network is small, so a step takes a few
milliseconds on 2 CPU cores and the ratio is an upper bound for real networks (an AlexNet
step on a GPU takes tens of milliseconds, NCCL's small all-reduce tens of microseconds).

    .venv/bin/python benchmarks/bench_stop_poll.py [--steps 200] [--rounds 5] [--world 2]

The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from dcluster.parallel.collectives import Comm
from dcluster.core.config import CheckpointConfig, DistributedConfig, ModelConfig
from dcluster.parallel.distributed import Env, process_group
from dcluster.models import build_model
from dcluster.runtime.optimize import EpochProgress, StepLoop
from dcluster.runtime.stages import BatchLoss, PassPlan
from dcluster.runtime.stop import StopPoints, StopRequest

BATCH = 16
CROP = 32
CLUSTERS = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor
    next_position: int


def timed_steps(net: DistributedDataParallel, optimizer: torch.optim.Optimizer, steps: int,
                stops: StopPoints | None) -> float:
    """Seconds per training step: the bare DDP loop (``stops`` None), or StepLoop's."""
    images = torch.randn(BATCH, 3, CROP, CROP)
    targets = torch.randint(0, CLUSTERS, (BATCH,))
    criterion = nn.CrossEntropyLoss()
    start = time.perf_counter()
    if stops is not None:
        batches = (Batch(images, targets, step + 1) for step in range(steps))
        plan = PassPlan(np.arange(steps * BATCH),
                        lambda b: BatchLoss(criterion(net(b.images), b.targets), BATCH),
                        [optimizer], net)
        StepLoop(torch.device("cpu"), "never", False, stops).run(plan, batches, steps, "bench",
                                                                 0, EpochProgress())
        return (time.perf_counter() - start) / steps
    with Join([net]):
        for _ in range(steps):
            loss = criterion(net(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()
    return (time.perf_counter() - start) / steps


def timed_polls(stops: StopPoints, polls: int) -> float:
    poll = stops.iteration_poll(0)
    finite = torch.zeros((), dtype=torch.bool)
    start = time.perf_counter()
    for _ in range(polls):
        poll.poll(lambda: finite)
    return (time.perf_counter() - start) / polls


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    env = Env(rank, world, 0, torch.device("cpu"), "bench", "127.0.0.1", port)
    with process_group(env, DistributedConfig(backend="gloo", timeout_s=120)):
        comm = Comm(env)
        model = build_model(ModelConfig(arch="smallconv", width=32, fc_dim=256, dropout=0.5,
                                        fc_init="fan_in"), CROP)
        model.reset_head(CLUSTERS, torch.Generator().manual_seed(0))
        net = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        stops = StopPoints(StopRequest(), CheckpointConfig(), comm)
        timed_steps(net, optimizer, 20, None)  # warm-up
        baseline, polled, polls = [], [], []
        for _ in range(args.rounds):
            baseline.append(timed_steps(net, optimizer, args.steps, None))
            polled.append(timed_steps(net, optimizer, args.steps, stops))
            polls.append(timed_polls(stops, args.steps))
        if rank == 0:
            out.put({"world": world, "steps": args.steps, "rounds": args.rounds,
                     "baseline_ms_per_step": 1e3 * statistics.median(baseline),
                     "polled_ms_per_step": 1e3 * statistics.median(polled),
                     "poll_us": 1e6 * statistics.median(polls)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(rank_main, args=(args.world, free_port(), args, out), nprocs=args.world,
                       start_method="spawn")
    result = out.get()
    result["polled_over_baseline"] = result["polled_ms_per_step"] / result["baseline_ms_per_step"]
    print(f"{args.world} gloo ranks, demo network, batch {BATCH}: "
          f"{result['baseline_ms_per_step']:.2f} ms/step without the poll, "
          f"{result['polled_ms_per_step']:.2f} ms/step with it "
          f"({result['polled_over_baseline']:.3f}x); the poll alone {result['poll_us']:.0f} us")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
