"""The sharded evaluation (k-NN, k-means probe) scores exactly as the gathered one it replaced,
on one and two gloo ranks, and gathers no feature rows beyond k-means++'s bounded sample."""
import functools
import pickle
from pathlib import Path
from typing import Optional, Sequence

import faiss
import numpy as np
import pytest
import torch

from dcluster.clustering import kmeans_labels
from dcluster.clustering.kmeanspp import SEEDING_POINTS_PER_CENTROID
from dcluster.clustering.pca import l2_normalize
from dcluster.core.metrics import nmi
from dcluster.evaluation.clusters import kmeans_scores
from dcluster.evaluation.knn import knn_accuracy
from dcluster.evaluation.scoring import topk_accuracy
from dcluster.parallel.collectives import Comm
from dcluster.parallel.distributed import Env, shard_bounds
from ranks import spawn_ranks

N_CLASSES = 10
K_NN, TEMPERATURE = 20, 0.07


def blobs(n: int, dim: int, seed: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping classes (spread near the centres' distance), so that votes and clusters
    are not trivially right and a wrong merge would change them."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((N_CLASSES, dim))
    labels = rng.integers(0, N_CLASSES, n)
    return (centres[labels] + spread * rng.standard_normal((n, dim))).astype(np.float32), labels


BANK = blobs(3000, 24, seed=0, spread=1.2)
QUERIES = blobs(1500, 24, seed=1, spread=1.2)
FEATURES = blobs(2000, 16, seed=2, spread=0.9)


def gathered_knn_votes(bank: np.ndarray, bank_labels: np.ndarray,
                       queries: np.ndarray) -> np.ndarray:
    """The gathered k-NN this project ran before the sharded one: every row in one FAISS
    flat L2 index (distances between unit vectors), votes exp(cos / T)."""
    xb, xq = l2_normalize(bank.copy()), l2_normalize(queries.copy())
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    distances, neighbours = index.search(xq, K_NN)
    weights = np.exp((1.0 - distances.astype(np.float64) / 2.0) / TEMPERATURE)
    votes = np.zeros((len(xq), N_CLASSES))
    np.add.at(votes, (np.arange(len(xq))[:, None], bank_labels[neighbours]), weights)
    return votes


def gathered_kmeans(features: np.ndarray, seed: int) -> np.ndarray:
    """The gathered class probe it replaced: centred, L2-normalised, k-means++ in one process."""
    centred = np.ascontiguousarray(features - features.mean(axis=0), dtype=np.float32)
    return kmeans_labels(l2_normalize(centred), N_CLASSES, seed, 20, "cpu", plus_plus=True)


class RowGatherGuard(Comm):
    """A communicator that fails on any gather of rows wider than a label beyond ``bound``
    rows in all (k-means++'s seeding sample is the one allowed, bounded by k, not N)."""

    bound = N_CLASSES * SEEDING_POINTS_PER_CENTROID

    def gather_rows(self, rows: np.ndarray, counts: Sequence[int],
                    out: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        if rows.ndim > 1 and sum(counts) > self.bound:
            raise AssertionError(f"gather of {sum(counts)} rows of {rows.shape[1:]} "
                                 f"(bound {self.bound})")
        return super().gather_rows(rows, counts, out)


def mine(arrays: tuple[np.ndarray, np.ndarray], comm: Comm) -> tuple[np.ndarray, np.ndarray]:
    bounds = shard_bounds(len(arrays[1]), comm.world_size)
    lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
    return arrays[0][lo:hi], arrays[1][lo:hi]


def sharded_rank(out: Path, comm: Comm) -> None:
    guarded = RowGatherGuard(comm.env)
    device = torch.device("cpu")
    (bank, bank_labels), (queries, query_labels) = mine(BANK, comm), mine(QUERIES, comm)
    knn = knn_accuracy(bank, bank_labels, queries, query_labels, K_NN, TEMPERATURE, N_CLASSES,
                       guarded, device)
    features, labels = mine(FEATURES, comm)
    clusters = kmeans_scores(features, labels, 7, guarded, device, kmeans_device="cpu")
    pred = kmeans_labels(l2_normalize(np.ascontiguousarray(
        features - features_mean(comm), dtype=np.float32)), N_CLASSES, 7, 20, "cpu",
        plus_plus=True, comm=guarded, own_device=device)
    (out / f"rank{comm.rank}.pkl").write_bytes(pickle.dumps((knn, clusters, pred)))


def features_mean(comm: Comm) -> np.ndarray:
    from dcluster.clustering.distributed_stage import global_mean
    return global_mean(mine(FEATURES, comm)[0], comm)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[int, list]:
    """{world size: each rank's (k-NN scores, probe scores, its rows' cluster numbers)}."""
    results = {}
    for world in (1, 2):
        out = tmp_path_factory.mktemp(f"world{world}")
        spawn_ranks(functools.partial(sharded_rank, out), world)
        results[world] = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    return results


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_knn_scores_as_the_gathered_search(sharded, world):
    expected = topk_accuracy(gathered_knn_votes(*BANK, QUERIES[0]), QUERIES[1])
    assert 0.3 < expected["top1"] < 0.95  # overlapping classes: a score that can move
    for knn, _, _ in sharded[world]:
        assert knn == expected  # top-1 and top-5 identical, on every rank


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_class_probe_finds_the_gathered_partition(sharded, world):
    reference = gathered_kmeans(*FEATURES[:1], seed=7)
    pred = np.concatenate([p for _, _, p in sharded[world]])
    if world == 1:
        np.testing.assert_array_equal(pred, reference)
    assert nmi(pred, reference) >= 0.999
    scores = [clusters for _, clusters, _ in sharded[world]]
    assert scores[0] == scores[-1]  # the same on every rank
    assert scores[0]["nmi"] == pytest.approx(nmi(reference, FEATURES[1]), abs=1e-3)


def test_the_guard_fails_on_a_gather_of_every_row(tmp_path):
    with pytest.raises(Exception):
        spawn_ranks(functools.partial(gather_everything, tmp_path), 2)


def gather_everything(out: Path, comm: Comm) -> None:
    rows = mine(FEATURES, comm)[0]
    RowGatherGuard(comm.env).gather_rows(rows, comm.all_gather_object(len(rows)))


def test_training_monitor_and_eval_on_two_ranks_gather_no_feature_rows(demo_digits, tmp_path):
    """`dcluster train` with the monitor every epoch (sharded clustering) and `eval clusters`
    / `eval knn` of its checkpoint, two gloo ranks, under a guard that fails any gather of more
    than k-means++'s seeding sample of rows wider than a label (640 of the 1,797 digits: the
    gathered evaluation this replaced gathered all 1,797)."""
    from reference_runs import run_pair, train_args
    from ranks import describe

    guard = ["--row-gather-bound", str(RowGatherGuard.bound)]
    runs = tmp_path / "runs"
    train = train_args(demo_digits, runs, "guarded", "epochs=1", "monitor.every=1",
                       "clustering.mode=sharded")
    outcomes = run_pair(guard, train, tmp_path / "train")
    assert all(o.returncode == 0 for o in outcomes), describe(outcomes)
    assert "monitor (end of epoch): kNN top1" in outcomes[0].output
    for protocol in ("clusters", "knn"):
        outcomes = run_pair(guard, ["eval", protocol, str(runs / "guarded")], tmp_path / protocol)
        assert all(o.returncode == 0 for o in outcomes), describe(outcomes)
        assert list((runs / "guarded" / "eval").glob(f"{protocol}_e*.json"))
