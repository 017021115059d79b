"""Real `dcluster train` runs of the small demo and their uninterrupted references, computed
once per test session (a pytest plugin, registered in conftest.py) and shared by the stop,
resume and Slurm tests that compare against them.

Every run here computes the same thing as its reference: name, runs_root, keep_last,
tracking and the collective timeout only change where it lands and what it records. The
processes run tests/rank_main.py, which records each rank's training batches
(--record-orders) so that a test can check that no image was skipped or repeated across a
stop.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from dcluster.runtime.checkpoint import checkpoint_name, load_checkpoint
from dcluster.reporting.telemetry import SPEED
from helpers import SMALL_DEMO, TINY_MMDC, assert_same_weights
from interrupts import clusterings
from ranks import RankOutcome, describe, free_port, rank_command, run_ranks, torchrun_env

EPOCHS = 3
BATCH = 16
IMAGES = 400  # the digits_subset fixture
BATCHES = math.ceil(IMAGES / BATCH)  # training iterations per epoch in one process
RANK_BATCHES = math.ceil(IMAGES // 2 / BATCH)  # ... and on each of two ranks
# what places a process in a job (dcluster/parallel/distributed.py): a single process must see none
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

MMDC_EPOCHS = 1  # + MMDC_REFINE refinement epochs
MMDC_REFINE = 1
MMDC_BATCH = 32
MMDC_RANK_BATCHES = math.ceil(IMAGES // 2 / MMDC_BATCH)  # per pass, on each of two ranks


def train_args(data: Path, runs: Path, name: str, *extra: str) -> list[str]:
    """`dcluster train` of the small DeepCluster demo (tracking off unless ``extra`` turns it
    on)."""
    return ["train", "configs/demo.yaml", f"name={name}", f"data.path={data}",
            f"runs_root={runs}", f"epochs={EPOCHS}", *SMALL_DEMO,
            "tracking.enabled=false", "eval.class_kmeans=false", "threads=1",
            "distributed.timeout_s=60", "checkpoint.keep_last=100", *extra]


def mmdc_train_args(data: Path, runs: Path, name: str, *extra: str) -> list[str]:
    """`dcluster train` of a tiny MMDC run: one epoch, one refinement epoch, rotations."""
    return ["train", "configs/mmdc_demo.yaml", f"name={name}", f"data.path={data}",
            f"runs_root={runs}", f"epochs={MMDC_EPOCHS}", f"mmdc.refine_epochs={MMDC_REFINE}",
            "mmdc.rotation=true", f"optim.batch_size={MMDC_BATCH}", *TINY_MMDC,
            "tracking.enabled=false", "tracking.plots=false", "threads=1",
            "distributed.timeout_s=60", "checkpoint.keep_last=100", *extra]


def single_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in LAUNCH_VARS and not key.startswith(("SLURM_", "SUBMITIT_"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run_single(command: list[str], logs: Path, **env: str) -> RankOutcome:
    """One process from the repository root, waited for (killed on timeout)."""
    [outcome] = run_ranks([command], [single_env(**env)], logs)
    return outcome


def run_pair(patches: list[str], args: list[str], logs: Path) -> list[RankOutcome]:
    """Two gloo ranks of `rank_main.py PATCHES ARGS` with torchrun's variables."""
    port = free_port()
    return run_ranks([rank_command(*patches, *args)] * 2,
                     [torchrun_env(r, 2, "127.0.0.1", port) for r in range(2)], logs)


def start_run(ranks: int, args: list[str], orders: Path, logs: Path,
              interrupt: Optional[str] = None) -> list[RankOutcome]:
    """The run in one process or as two ranks, recording their training orders; rank 0
    sends itself SIGUSR2 at ``interrupt``."""
    patches = ["--record-orders", str(orders)]
    if interrupt:
        patches = ["--interrupt", interrupt, *patches]
    if ranks == 1:
        return [run_single(rank_command(*patches, *args), logs)]
    return run_pair(patches, args, logs)


def interrupted_command(point: str, signame: str, orders: Path, args: list[str]) -> list[str]:
    return rank_command("--interrupt", point, "--signal", signame, "--record-orders", str(orders),
                        *args)


def recording(orders: Path, args: list[str]) -> list[str]:
    return rank_command("--record-orders", str(orders), *args)


def new_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@dataclass
class Run:
    """What a finished run left: its directory and the training orders its processes recorded."""
    root: Path
    orders: Path
    epochs: int = EPOCHS
    outputs: list[str] = field(default_factory=list)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, epoch: int, step: int = 0) -> Path:
        return self.checkpoints / checkpoint_name(epoch, step)

    def final(self) -> dict:
        return load_checkpoint(self.checkpoint(self.epochs))

    def checkpoint_names(self) -> list[str]:
        return sorted(p.name for p in self.checkpoints.glob("ckpt_*.pt"))

    def clusterings(self) -> int:
        """DeepCluster clusterings run by rank 0 over all the run's processes."""
        return clusterings(self.orders)


def comparable(history: list[dict]) -> list[dict]:
    """An epoch record without its wall times and throughput telemetry; NaN as a string so
    that it equals itself."""
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v
             for k, v in record.items() if not k.startswith(("time_", SPEED))}
            for record in history]


def orders_of(directory: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text().splitlines() for p in sorted(directory.glob("rank*-epoch*.txt"))}


def assert_same_orders(reference: Run, run: Run) -> None:
    """Every rank trained on the same batches in the same order in every epoch: nothing
    skipped, nothing repeated across a stop."""
    want, have = orders_of(reference.orders), orders_of(run.orders)
    assert want and have.keys() == want.keys()
    for name in want:
        assert have[name] == want[name], f"{name}: the training order differs"


# where each method's checkpoint holds its optimisers' states
DEEPCLUSTER_OPTIMIZERS = (("body_optimizer",), ("head", "optimizer"))
MMDC_OPTIMIZERS = (("optimizer",),)


def _entry(payload: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        payload = payload[key]
    return payload


def assert_same_run(reference: Run, run: Run,
                    optimizers: tuple[tuple[str, ...], ...] = DEEPCLUSTER_OPTIMIZERS) -> None:
    """Same final weights and optimiser momentum, same epoch records (loss, objective, NMI,
    ...), same clusters (and MMDC's targets), and the same training orders."""
    expected, got = reference.final(), run.final()
    assert_same_weights(expected["model"], got["model"])
    for path in optimizers:
        for slot, state in _entry(expected, path)["state"].items():
            assert torch.equal(state["momentum_buffer"],
                               _entry(got, path)["state"][slot]["momentum_buffer"]), path
    if "targets" in expected:
        for key in ("assignment", "refined"):
            assert np.array_equal(expected["targets"][key], got["targets"][key]), key
    assert comparable(got["history"]) == comparable(expected["history"])
    assert np.array_equal(got["clusters"]["labels"], expected["clusters"]["labels"])
    for epoch in range(1, run.epochs + 1):
        name = f"epoch_{epoch:06d}.npy"
        assert np.array_equal(np.load(run.root / "assignments" / name),
                              np.load(reference.root / "assignments" / name)), name
    assert_same_orders(reference, run)


def reference_run(tmp: Path, args: list[str], name: str, ranks: int, epochs: int,
                  *patches: str) -> Run:
    orders = new_dir(tmp / "orders")
    if ranks == 1:
        outcomes = [run_single(recording(orders, args), tmp / "logs")]
    else:
        outcomes = run_pair(["--record-orders", str(orders), *patches], args, tmp / "logs")
    assert [o.returncode for o in outcomes] == [0] * ranks, describe(outcomes)
    return Run(tmp / "runs" / name, orders, epochs, [o.output for o in outcomes])


@pytest.fixture(scope="session")
def reference(digits_subset, tmp_path_factory) -> Run:
    """The DeepCluster run never stopped, one process."""
    tmp = tmp_path_factory.mktemp("reference")
    run = reference_run(tmp, train_args(digits_subset, tmp / "runs", "reference"), "reference",
                        1, EPOCHS)
    assert run.checkpoint_names() == [checkpoint_name(e, 0) for e in range(1, EPOCHS + 1)]
    assert [len(lines) for lines in orders_of(run.orders).values()] == [BATCHES] * EPOCHS
    return run


@pytest.fixture(scope="session")
def bf16_reference(digits_subset, tmp_path_factory) -> Run:
    """The DeepCluster run never stopped, one process, in bf16 autocast."""
    tmp = tmp_path_factory.mktemp("bf16_reference")
    return reference_run(tmp, train_args(digits_subset, tmp / "runs", "bf16_reference",
                                         "optim.precision=bf16"), "bf16_reference", 1, EPOCHS)


@pytest.fixture(scope="session")
def pair_reference(digits_subset, tmp_path_factory) -> Run:
    """The DeepCluster run never stopped, two ranks; each rank also saved its weights after
    every epoch to ``weights/rank<R>.pt`` beside the run's runs_root."""
    tmp = tmp_path_factory.mktemp("pair_reference")
    return reference_run(tmp, train_args(digits_subset, tmp / "runs", "pair_reference"),
                         "pair_reference", 2, EPOCHS, "--save-weights", str(new_dir(tmp / "weights")))


BANK = ("clustering.features=training_pass",)  # DeepCluster on the feature bank


@pytest.fixture(scope="session")
def bank_pair_reference(digits_subset, tmp_path_factory) -> Run:
    """The DeepCluster run on the feature bank never stopped, two ranks."""
    tmp = tmp_path_factory.mktemp("bank_pair_reference")
    return reference_run(tmp, train_args(digits_subset, tmp / "runs", "bank_pair_reference",
                                         *BANK), "bank_pair_reference", 2, EPOCHS)


@pytest.fixture(scope="session")
def mmdc_reference(digits_subset, tmp_path_factory) -> Run:
    """The tiny MMDC run never stopped, one process."""
    tmp = tmp_path_factory.mktemp("mmdc_reference")
    return reference_run(tmp, mmdc_train_args(digits_subset, tmp / "runs", "mmdc_reference"),
                         "mmdc_reference", 1, MMDC_EPOCHS + MMDC_REFINE)


@pytest.fixture(scope="session")
def mmdc_pair_reference(digits_subset, tmp_path_factory) -> Run:
    """The tiny MMDC run never stopped, two ranks."""
    tmp = tmp_path_factory.mktemp("mmdc_pair_reference")
    return reference_run(tmp, mmdc_train_args(digits_subset, tmp / "runs", "mmdc_pair_reference"),
                         "mmdc_pair_reference", 2, MMDC_EPOCHS + MMDC_REFINE)
