"""dcluster's training step and feature pass against a bare PyTorch loop over the same model
and the same in-memory batches, in fp32 and bf16 (autocast), on this machine's CPU.

* train: a DeepCluster pass (``passes.run_pass``) through the step loop the runs use (StepLoop: autocast,
  loss scaling when fp16, the loss summed on the device, the stop poll, the data-wait clock)
  against ``forward, loss, zero_grad, backward, step, loss.item()`` per batch;
* features: ``extract.extract_features`` (eval mode, autocast, rows as float32 numpy)
  against a ``torch.no_grad()`` loop that keeps each batch's features and concatenates them.

The batches are decoded once and held in memory (an in-memory Pipelines), so the loader is
not measured: what is left is what dcluster's loops add to the model's own work. Rounds
alternate (bare, dcluster, then dcluster, bare, ...; fp32 then bf16); a ratio is the median
of the rounds' own ratios, so load from elsewhere on the machine that changes between rounds
cancels out (the rates printed are medians too). The model is the demo's
(configs/demo.yaml: Sobel smallconv, width 32, fc 256, 32x32 crops, 30 clusters), whose small
steps make any per-step overhead show.

    .venv/bin/python benchmarks/bench_train_step.py [--rounds 5] [--batches 20] [--threads 1]

bf16 on a CPU without native bf16 instructions runs 5-20x slower than fp32 (oneDNN emulates
it): the ratios are what this measures, not bf16's speed.

The last line of output is one JSON object: throughput ratios ``train_step_over_bare`` and
``feature_pass_over_bare`` (dcluster's images/s over the bare loop's; the worst of the two
precisions) and the per-precision numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcluster.parallel.collectives import Comm
from dcluster.core.config import CheckpointConfig, ModelConfig, OptimConfig
from dcluster.data import FeatureBatch, TrainBatch
from dcluster.parallel.distributed import Env
from dcluster.parallel.execution import Execution
from dcluster.runtime.extract import extract_features
from dcluster.models import build_model
from dcluster.runtime.optimize import EpochProgress, StepLoop, sgd
from dcluster.runtime.passes import run_pass
from dcluster.runtime.stages import BatchLoss, PassPlan
from dcluster.runtime.stop import StopPoints, StopRequest

CROP = 32
CLUSTERS = 30
MODEL = ModelConfig(arch="smallconv", width=32, fc_dim=256, dropout=0.5, fc_init="fan_in")
OPTIM = OptimConfig(lr=0.01, momentum=0.9, weight_decay=1e-5)


@dataclass
class InMemory:
    """A Pipelines whose batches are made once and then handed out again: index lists in,
    the same tensors out, nothing decoded or copied while timed (both loops iterate the
    same lists)."""
    images: torch.Tensor  # (N, 3, CROP, CROP)
    bad_indices: dict
    made: dict = field(default_factory=dict)

    def feature_batches(self, indices: Sequence[int], batch_size: int) -> Iterator[FeatureBatch]:
        key = ("features", len(indices), batch_size)
        if key not in self.made:
            self.made[key] = [FeatureBatch(self.images[chosen], chosen) for chosen in (
                torch.as_tensor(np.asarray(indices[first:first + batch_size]))
                for first in range(0, len(indices), batch_size))]
        return iter(self.made[key])

    def train_batches(self, order, epoch, batch_size, start_position=0
                      ) -> Iterator[TrainBatch]:
        key = ("train", len(order), batch_size, start_position)
        if key not in self.made:
            self.made[key] = [
                TrainBatch([self.images[chosen]], chosen, min(first + batch_size, len(order)))
                for first, chosen in ((first, torch.as_tensor(np.asarray(
                    order[first:first + batch_size])))
                    for first in range(start_position, len(order), batch_size))]
        return iter(self.made[key])


def new_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(MODEL, CROP)
    model.reset_head(CLUSTERS, torch.Generator().manual_seed(0))
    return model


def optimizers(model: nn.Module) -> list[torch.optim.Optimizer]:
    return [sgd(model.parameters(), OPTIM, OPTIM.lr)]


def bare_train(model, opts, data: InMemory, labels: np.ndarray, batch: int,
               execution: Execution) -> float:
    order = np.arange(len(labels))
    batches = list(data.train_batches(order, 0, batch))
    criterion = nn.CrossEntropyLoss()
    model.train()
    start = time.perf_counter()
    for b in batches:
        with torch.autocast("cpu", dtype=execution.dtype, enabled=execution.precision != "fp32"):
            loss = criterion(model(b.images), torch.from_numpy(labels[b.indices.numpy()]))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        loss.item()
    return len(order) / (time.perf_counter() - start)


def dcluster_train(model, opts, data: InMemory, labels: np.ndarray, batch: int,
                   execution: Execution) -> float:
    order = np.arange(len(labels))
    env = Env(0, 1, 0, torch.device("cpu"))
    stops = StopPoints(StopRequest(), CheckpointConfig(), Comm(env))
    steps = StepLoop(env.device, "never", False, stops, execution)
    targets = torch.from_numpy(labels)

    def loss_of(b) -> BatchLoss:
        return BatchLoss(F.cross_entropy(model(b.images), targets[b.indices]), len(b.indices))

    start = time.perf_counter()
    run_pass(steps, data, PassPlan(order, loss_of, opts, model), "train", 0, batch,
             EpochProgress())
    return len(order) / (time.perf_counter() - start)


def bare_features(model, data: InMemory, batch: int, execution: Execution) -> float:
    indices = np.arange(len(data.images))
    batches = list(data.feature_batches(indices, batch))
    model.eval()
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=execution.dtype,
                                         enabled=execution.precision != "fp32"):
        outs = [model.clustering_features(b.images) for b in batches]
    torch.cat(outs).float().numpy()
    model.train()
    return len(indices) / (time.perf_counter() - start)


def dcluster_features(model, data: InMemory, batch: int, execution: Execution) -> float:
    indices = np.arange(len(data.images))
    start = time.perf_counter()
    extract_features(model, data, indices, batch, torch.device("cpu"), "never", False,
                     execution=execution)
    return len(indices) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20, help="training batches per round")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch (the demo's)")
    parser.add_argument("--feature-batch-size", type=int, default=128)
    parser.add_argument("--feature-images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadier timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.batches * args.batch_size
    generator = torch.Generator().manual_seed(0)
    data = InMemory(torch.randn(max(n, args.feature_images), 3, CROP, CROP,
                                generator=generator), {})
    labels = torch.randint(0, CLUSTERS, (n,), generator=generator).numpy()
    model = new_model()
    opts = optimizers(model)
    runs: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        runs.setdefault(key, []).append(value)

    for precision in ("fp32", "bf16"):  # warm-up: oneDNN picks its kernels per dtype
        execution = Execution(torch.device("cpu"), precision)
        for train, features in ((bare_train, bare_features),
                                (dcluster_train, dcluster_features)):
            train(model, opts, data, labels, args.batch_size, execution)
            features(model, data, args.feature_batch_size, execution)
    for round_ in range(args.rounds):
        for precision in ("fp32", "bf16"):
            execution = Execution(torch.device("cpu"), precision)
            pairs = [("bare", bare_train, bare_features),
                     ("dcluster", dcluster_train, dcluster_features)]
            for name, train, features in pairs if round_ % 2 == 0 else pairs[::-1]:
                record(f"{precision}_train_{name}",
                       train(model, opts, data, labels, args.batch_size, execution))
                record(f"{precision}_features_{name}",
                       features(model, data, args.feature_batch_size, execution))
    result: dict[str, float] = {"rounds": args.rounds, "train_images": n,
                                "feature_images": len(data.images),
                                "batch_size": args.batch_size,
                                "feature_batch_size": args.feature_batch_size,
                                "threads": torch.get_num_threads()}
    for key, values in runs.items():
        result[f"{key}_img_s"] = statistics.median(values)
    for precision in ("fp32", "bf16"):
        for kind in ("train", "features"):
            # the median of each round's own ratio: the two loops of a round ran back to back,
            # so a change of load between rounds cancels out of it
            result[f"{precision}_{kind}_over_bare"] = statistics.median(
                ours / bare for ours, bare in zip(runs[f"{precision}_{kind}_dcluster"],
                                                  runs[f"{precision}_{kind}_bare"]))
    result["train_step_over_bare"] = min(result[f"{p}_train_over_bare"] for p in ("fp32", "bf16"))
    result["feature_pass_over_bare"] = min(result[f"{p}_features_over_bare"]
                                           for p in ("fp32", "bf16"))
    for precision in ("fp32", "bf16"):
        print(f"{precision}: training {result[f'{precision}_train_dcluster_img_s']:.0f} img/s vs "
              f"bare {result[f'{precision}_train_bare_img_s']:.0f} "
              f"({result[f'{precision}_train_over_bare']:.3f}x); features "
              f"{result[f'{precision}_features_dcluster_img_s']:.0f} img/s vs bare "
              f"{result[f'{precision}_features_bare_img_s']:.0f} "
              f"({result[f'{precision}_features_over_bare']:.3f}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
