"""DeepCluster-v2 on the run harness, with real `dcluster train` processes: a tiny run (400
digits, 3 multi-crop views, 2 heads, 2 epochs) on two gloo ranks trains on disjoint slices of
one order, and a stop signal at each kind of stop point of its epoch (during the bank's
feature pass, before a training step) checkpoints where the epoch stands; the same command
then ends with the uninterrupted run's weights (prototypes included), LARS momentum,
assignments, memory banks, epoch records and training orders. Two ranks only: one process
is the same harness, which the MMDC and DeepCluster tests stop and resume in one process."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dcluster.runtime.checkpoint import load_checkpoint, shard_path
from ranks import describe
from reference_runs import (IMAGES, Run, assert_same_run, new_dir, orders_of, reference_run,
                            start_run)

EPOCHS = 2
BATCH = 32
HEADS = (10, 12)
RANK_BATCHES = math.ceil(IMAGES // 2 / BATCH)
OPTIMIZERS = (("optimizer",),)


def v2_args(data: Path, runs: Path, name: str) -> list[str]:
    """`dcluster train` of a tiny DeepCluster-v2 run: the MNIST preset, made small."""
    return ["train", "configs/deepclusterv2_mnist.yaml", f"name={name}", f"data.path={data}",
            f"runs_root={runs}", f"epochs={EPOCHS}", f"optim.batch_size={BATCH}",
            "model.width=8", "deepclusterv2.hidden_mlp=32", "deepclusterv2.feat_dim=16",
            f"deepclusterv2.prototypes=[{HEADS[0]}, {HEADS[1]}]", "deepclusterv2.warmup_epochs=1",
            "data.crops=[{size: 32, count: 2, scale: [0.5, 1.0]}, "
            "{size: 16, count: 1, scale: [0.25, 0.6]}]",
            "tracking.enabled=false", "tracking.plots=false", "threads=1",
            "distributed.timeout_s=60", "checkpoint.keep_last=100"]


@pytest.fixture(scope="module")
def v2_pair_reference(digits_subset, tmp_path_factory) -> Run:
    """The tiny run never stopped, two ranks."""
    tmp = tmp_path_factory.mktemp("v2_pair_reference")
    return reference_run(tmp, v2_args(digits_subset, tmp / "runs", "v2_pair_reference"),
                         "v2_pair_reference", 2, EPOCHS)


def banks(checkpoint: Path, ranks: int) -> list[tuple[np.ndarray, torch.Tensor]]:
    """Each memory bank's stamps and rows, from its shard files."""
    load_checkpoint(checkpoint, with_shards=True)  # every shard checksummed
    found = []
    for number in range(2):  # crops_for_assign [0, 1]: one bank per view
        shards = [torch.load(shard_path(checkpoint, f"bank{number}", r), weights_only=False)
                  for r in range(ranks)]
        found.append((np.concatenate([s["stamps"] for s in shards]),
                      torch.cat([s["rows"] for s in shards])))
    return found


def test_two_ranks_train_on_disjoint_slices_and_every_head_assigns_every_image(
        v2_pair_reference):
    orders = orders_of(v2_pair_reference.orders)
    for epoch in range(EPOCHS):
        ranks = [{int(i) for line in orders[f"rank{r}-epoch{epoch}.txt"] for i in line.split()}
                 for r in range(2)]
        assert not ranks[0] & ranks[1] and len(ranks[0] | ranks[1]) == IMAGES
    final = v2_pair_reference.final()
    labels = final["assignments"]["labels"]
    assert labels.shape == (2, IMAGES)
    for head, k in enumerate(HEADS):
        assert labels[head].min() >= 0 and labels[head].max() < k
        # the frozen prototypes are the spherical k-means' unit centroids
        weight = final["model"][f"prototypes.{head}.weight"]
        assert weight.shape == (k, 16)
        assert torch.allclose(weight.norm(dim=1), torch.ones(k), atol=1e-5)
    for rows in (rows for _, rows in banks(v2_pair_reference.checkpoint(EPOCHS), 2)):
        assert rows.shape == (IMAGES, 16)
        assert torch.allclose(rows.norm(dim=1), torch.ones(IMAGES), atol=1e-5)


def assert_same_banks(reference: Run, run: Run, ranks: int) -> None:
    for (stamps, rows), (want_stamps, want_rows) in zip(
            banks(run.checkpoint(EPOCHS), ranks), banks(reference.checkpoint(EPOCHS), ranks)):
        assert np.array_equal(stamps, want_stamps) and torch.equal(rows, want_rows)


RANKS = 2
CASES = [
    # epoch 1: signalled as its 3rd training batch is read, stopped after it
    ("train:1:3", (1, 4), "inside epoch 2, after its iteration 3"),
    # epoch 1's bank pass: a stop between two steps redoes the epoch
    ("features:1", (1, 0), "after epoch 1"),
]


@pytest.mark.parametrize("point, checkpoint, resume_log", CASES, ids=[c[0] for c in CASES])
def test_a_stopped_run_resumes_to_the_uninterrupted_result(point, checkpoint, resume_log,
                                                           v2_pair_reference, digits_subset,
                                                           tmp_path):
    reference, ranks = v2_pair_reference, RANKS
    name = "stopped"
    args = v2_args(digits_subset, tmp_path / "runs", name)
    run = Run(tmp_path / "runs" / name, new_dir(tmp_path / "orders"), EPOCHS)
    stopped = start_run(ranks, args, run.orders, tmp_path / "stopped", interrupt=point)
    assert [o.returncode for o in stopped] == [140] * ranks, describe(stopped)
    assert run.checkpoint_names()[-1] == run.checkpoint(*checkpoint).name, run.checkpoint_names()
    resumed = start_run(ranks, args, run.orders, tmp_path / "resumed")
    assert [o.returncode for o in resumed] == [0] * ranks, describe(resumed)
    assert f"resuming from {run.checkpoint(*checkpoint).resolve()} {resume_log}" in \
        resumed[0].output, resumed[0].output[-4000:]
    assert_same_run(reference, run, OPTIMIZERS)
    assert np.array_equal(run.final()["assignments"]["labels"],
                          reference.final()["assignments"]["labels"])
    assert_same_banks(reference, run, ranks)
