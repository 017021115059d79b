"""The feature bank of clustering.features=training_pass (dcluster/runtime/feature_bank.py): rows
routed across real gloo ranks to the rank that owns them, the newest draw kept, the rule for
rows the sampler did not draw, its shard files read back by another number of ranks, and its
reduced-precision storage against the float32 PCA subspace."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from dcluster.clustering.distributed_stage import cluster_shards
from dcluster.clustering.pca import PCAStats, fit_whitening
from dcluster.parallel.collectives import Comm
from dcluster.core.config import BankConfig, ClusteringConfig, ModelConfig
from dcluster.parallel.distributed import Env, shard_bounds
from dcluster.runtime.extract import ShardFeatures
from dcluster.runtime.feature_bank import (NEVER, STAMP_EPOCH, FeatureBank, TrainingFeatureTap,
                                   stamp_epoch)
from dcluster.models import build_model
from dcluster.runtime.sampler import balanced_order, rank_slice
from ranks import spawn_ranks

CPU = torch.device("cpu")
SINGLE = Comm(Env(0, 1, 0, CPU))
N, DIM, EPOCH, BATCH = 53, 6, 3, 4


def feature_of(index: int, rank: int, iteration: int) -> list[float]:
    """A row that says who computed it, for which image, when."""
    return [index, rank, iteration, index * 0.5, -rank, iteration + 0.25]


def training_orders(world: int) -> list[np.ndarray]:
    """Each rank's slice of a balanced order over skewed clusters: images drawn several times
    (small clusters), by different ranks, and images not drawn at all (large ones)."""
    labels = np.repeat([0, 1, 2, 3], [30, 15, 5, 3])
    return [rank_slice(balanced_order(labels, seed=7, epoch=EPOCH), rank, world)
            for rank in range(world)]


def expected_rows(world: int) -> dict[int, list[float]]:
    """Each drawn image's row: the one computed last, in (iteration, rank) order."""
    newest: dict[int, list[float]] = {}
    orders = training_orders(world)
    for iteration in range(max(len(o) for o in orders) // BATCH + 1):
        for rank, order in enumerate(orders):
            for index in order[iteration * BATCH:(iteration + 1) * BATCH]:
                newest[int(index)] = feature_of(int(index), rank, iteration)
    return newest


def run_training_pass(bank: FeatureBank, comm: Comm, pause_after: int) -> None:
    """Record this rank's batches as a training pass would, flushing (a mid-epoch
    checkpoint's delivery) after ``pause_after`` iterations and at the end."""
    order = training_orders(comm.world_size)[comm.rank]
    bank.begin_pass(EPOCH, len(order))
    for iteration, lo in enumerate(range(0, len(order), BATCH)):
        batch = order[lo:lo + BATCH]
        bank.record(torch.from_numpy(batch), iteration,
                    torch.tensor([feature_of(int(i), comm.rank, iteration) for i in batch]))
        if iteration + 1 == pause_after:
            bank.flush()
    bank.flush()


REPLACE = BankConfig(momentum=0.0)  # a row replaces the one held: each row is one draw's


def route_and_save(out: Path, comm: Comm) -> None:
    bank = FeatureBank(N, comm, REPLACE, CPU)
    run_training_pass(bank, comm, pause_after=3)
    shard = bank.features()
    # the clustering stage reads the bank in both modes, as it reads the extra pass
    labels = {mode: cluster_shards(shard.features, shard.indices, N,
                                   ClusteringConfig(k=3, pca_dim=4, pca_sample=0, mode=mode),
                                   comm, seed=1, device=CPU).labels
              for mode in ("gather", "sharded")}
    torch.save({"features": shard.features, "indices": shard.indices, "labels": labels,
                "stamps": bank.stamps, "shard": bank.shard_state()},
               out / f"rank{comm.rank}.pt")


@pytest.fixture(scope="module")
def routed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bank_ranks")
    spawn_ranks(functools.partial(route_and_save, out), world=2)
    return out


def test_across_two_ranks_each_row_is_the_one_its_trainer_computed_gathered_once(routed):
    expected = expected_rows(world=2)
    bounds = shard_bounds(N, 2)
    seen: list[int] = []
    for rank in range(2):
        got = torch.load(routed / f"rank{rank}.pt", weights_only=False)
        indices = got["indices"]
        # the rows this rank clusters: its own index range, ascending, each once
        assert np.all((indices >= bounds[rank]) & (indices < bounds[rank + 1]))
        assert np.all(np.diff(indices) > 0)
        for index, row in zip(indices.tolist(), got["features"].tolist()):
            assert row == expected[index], index
            # the stamp names the rank and the iteration that computed the row
            stamp = int(got["stamps"][index - bounds[rank]]) - EPOCH * STAMP_EPOCH - 1
            assert [stamp // 2, stamp % 2] == [row[2], row[1]]
        seen.extend(indices.tolist())
    # every drawn image is gathered exactly once across the ranks, the undrawn ones not at all
    assert sorted(seen) == sorted(expected)
    assert 0 < len(expected) < N
    # and clustered, in gather and in sharded mode: a label for every image with a row
    for mode in ("gather", "sharded"):
        labels = torch.load(routed / "rank0.pt", weights_only=False)["labels"][mode]
        assert np.flatnonzero(labels >= 0).tolist() == sorted(expected), mode
        assert set(labels[labels >= 0].tolist()) == {0, 1, 2}, mode


def test_a_bank_written_by_two_ranks_resumes_in_one_process(routed):
    shards = [torch.load(routed / f"rank{r}.pt", weights_only=False)["shard"] for r in range(2)]
    bank = FeatureBank(N, SINGLE, REPLACE, CPU)
    bank.load_shards({**bank.state_dict(), "shards": [{}, {}]}, lambda rank: shards[rank])
    expected = expected_rows(world=2)
    shard = bank.features()
    assert shard.indices.tolist() == sorted(expected)
    assert shard.features.tolist() == [expected[i] for i in sorted(expected)]


def test_rows_older_than_max_age_are_recomputed_and_the_first_epoch_computes_all():
    bank = FeatureBank(N, SINGLE, BankConfig(max_age=2, momentum=0.0), CPU)
    # nothing computed yet: the first clustering's pass covers every readable image
    unreadable = {5, 17}
    first = bank.stale(0, 2, unreadable)
    assert first.tolist() == [i for i in range(N) if i not in unreadable]
    bank.refresh(ShardFeatures(torch.ones(len(first), DIM), first), epoch=0)
    assert bank.stale(0, 2, unreadable).size == 0
    # epoch 1 trains on some images; at epoch 3 the rows refreshed at epoch 0 are 3 epochs old
    bank.begin_pass(1, 10)
    drawn = first[:10]  # a training pass never sees an unreadable image
    bank.record(torch.from_numpy(drawn), 0, torch.zeros(10, DIM))
    bank.flush()
    assert bank.stale(2, 2, unreadable).size == 0
    assert bank.stale(3, 2, unreadable).tolist() == first[10:].tolist()
    assert sorted(set(bank.ages(3).tolist())) == [2, 3]
    # unreadable images have no row: the clustering never sees them
    assert set(bank.features().indices.tolist()) == set(first.tolist())
    assert bank.stamps[5] == NEVER and stamp_epoch(bank.stamps[drawn]).tolist() == [1] * 10


def test_a_newer_row_wins_whatever_order_the_rows_arrive_in():
    bank = FeatureBank(4, SINGLE, REPLACE, CPU)
    bank.begin_pass(2, 3)
    bank.record(torch.tensor([1]), 5, torch.full((1, DIM), 5.0))
    bank.record(torch.tensor([1, 2]), 4, torch.full((2, DIM), 4.0))  # an older iteration
    bank.flush()
    assert bank.features().features[:, 0].tolist() == [5.0, 4.0]
    bank.refresh(ShardFeatures(torch.full((1, DIM), 9.0), np.array([1])), epoch=2)
    assert bank.features().features[0, 0] == 5.0, "a refresh is older than the epoch's training"


@pytest.mark.parametrize("dtype, tolerance", [("float16", 1e-7), ("bfloat16", 1e-5)])
def test_reduced_precision_storage_keeps_the_pca_subspace(dtype, tolerance):
    """The subspace the PCA fits on rows stored in ``dtype`` captures the variance of the
    float32 rows' subspace to within ``tolerance``."""
    gen = torch.Generator().manual_seed(0)
    n, dim, keep = 4000, 128, 16
    spectrum = torch.logspace(1, -2, dim)
    x = (torch.randn(n, dim, generator=gen) * spectrum) @ torch.linalg.qr(
        torch.randn(dim, dim, generator=gen))[0] + 3.0
    bank = FeatureBank(n, SINGLE, BankConfig(dtype=dtype), CPU)
    bank.refresh(ShardFeatures(x, np.arange(n)), epoch=0)
    stored = bank.features().features
    assert stored.dtype == getattr(torch, dtype)

    def projection(rows: torch.Tensor) -> torch.Tensor:
        return fit_whitening(PCAStats(dim).update(rows), keep, whiten=False).projection.double()

    cov = torch.cov(x.double().T)
    exact, reduced = projection(x), projection(stored)
    captured = float(torch.trace(reduced.T @ cov @ reduced) / torch.trace(exact.T @ cov @ exact))
    assert captured >= 1 - tolerance, captured


def test_the_tap_reads_the_clustering_features_of_a_training_forward():
    """In eval mode a training forward's tapped rows are exactly clustering_features; the
    in-place ReLU after the tapped layer does not reach them."""
    model = build_model(ModelConfig(arch="smallconv", width=4, fc_dim=16, sobel=True), 32)
    model.reset_head(5, torch.Generator().manual_seed(0))
    model.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), TrainingFeatureTap(model.clustering_feature_layer()) as tap:
        model(x)
        tapped = tap.take()
        assert torch.equal(tapped, model.clustering_features(x))
        assert (tapped < 0).any(), "taken before the ReLU"


def test_with_momentum_rows_blend_in_stamp_order_however_they_are_flushed():
    """Rows blend into the held row, oldest first; one flush or two (a mid-epoch
    checkpoint between the draws) end bit-for-bit the same."""
    def bank_after(flush_between: bool) -> torch.Tensor:
        bank = FeatureBank(3, SINGLE, BankConfig(momentum=0.75), CPU)
        bank.refresh(ShardFeatures(torch.full((3, DIM), 8.0), np.arange(3)), epoch=0)
        bank.begin_pass(1, 5)
        bank.record(torch.tensor([0, 1]), 0, torch.full((2, DIM), 4.0))
        if flush_between:
            bank.flush()
        bank.record(torch.tensor([0]), 1, torch.full((1, DIM), 0.0))
        bank.flush()
        return bank.features().features

    once, twice = bank_after(False), bank_after(True)
    assert torch.equal(once, twice)
    # image 0: 8 -> 0.75 * 8 + 0.25 * 4 = 7 -> 0.75 * 7 + 0.25 * 0 = 5.25; image 1: 7; 2: 8
    assert once[:, 0].tolist() == [5.25, 7.0, 8.0]
