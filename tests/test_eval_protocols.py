"""The evaluation protocols' cores on synthetic features whose answer is known."""
import functools
import pickle

import numpy as np
import pytest
import torch

from dcluster.core.config import LinearEvalConfig
from dcluster.evaluation.clusters import kmeans_scores
from dcluster.evaluation.knn import class_votes, knn_accuracy
from dcluster.evaluation.linear import LinearProbe, pooled_side, probe_scores, train_probe
from dcluster.evaluation.scoring import topk_accuracy
from dcluster.parallel.collectives import Comm
from dcluster.parallel.distributed import Env
from dcluster.runtime.sampler import rank_slice
from ranks import spawn_ranks

N_CLASSES = 10


def blobs(n: int, dim: int, seed: int, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Linearly separable classes: unit-distance class centres, small Gaussian spread."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((N_CLASSES, dim))
    labels = rng.integers(0, N_CLASSES, n)
    x = centres[labels] + spread * rng.standard_normal((n, dim))
    return x.astype(np.float32), labels


def test_topk_accuracy_counts_labels_among_the_best_scores():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(scores, np.array([1, 1, 0]), ks=(1, 2, 5))
    assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3), "top5": 1.0}


SINGLE = Env(0, 1, 0, torch.device("cpu"))


def test_knn_is_near_perfect_on_separable_features():
    x_train, y_train = blobs(2000, 32, seed=0)
    x_val, y_val = blobs(500, 32, seed=1)
    acc = knn_accuracy(x_train, y_train, x_val, y_val, k=20, temperature=0.07,
                       n_classes=N_CLASSES, comm=Comm(SINGLE), device=torch.device("cpu"))
    assert acc["top1"] > 0.98


def test_knn_votes_are_weighted_by_similarity():
    similarity = np.array([[0.99, 0.85, 0.75]])
    votes = class_votes(similarity, np.array([[0, 1, 1]]), temperature=0.07, n_classes=2)
    # two neighbours of class 1 lose to one much closer neighbour of class 0
    assert votes[0, 0] > votes[0, 1] > 0
    assert votes[0, 0] == pytest.approx(np.exp(0.99 / 0.07))


def as_maps(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)[:, :, None, None]  # (B, C, 1, 1) activations


def probe_on_blobs(comm: Comm) -> tuple[LinearProbe, list[float]]:
    """The probe trained on this rank's slice of each epoch's order of 2,000 blob points."""
    torch.manual_seed(0)
    x_train, y_train = blobs(2000, 32, seed=0, spread=0.5)

    def batches(epoch: int):
        order = rank_slice(np.random.default_rng(epoch).permutation(len(y_train)), comm.rank,
                           comm.world_size)
        for chunk in np.array_split(order, 16 // comm.world_size):
            yield as_maps(x_train[chunk]), torch.from_numpy(y_train[chunk])

    probe = LinearProbe(channels=32, size=1, pooled_dim=9000, n_classes=N_CLASSES)
    env = Env(comm.rank, comm.world_size, 0, torch.device("cpu"))
    return probe, train_probe(probe, batches, LinearEvalConfig(epochs=5, lr=0.1), env, comm)


def val_top1(probe: LinearProbe) -> float:
    x_val, y_val = blobs(500, 32, seed=1, spread=0.5)
    scores, labels = probe_scores(probe, [(as_maps(x_val), torch.from_numpy(y_val))])
    return topk_accuracy(scores, labels)["top1"]


def test_linear_probe_is_near_perfect_on_separable_features():
    probe, losses = probe_on_blobs(Comm(SINGLE))
    assert losses[-1] < losses[0]
    assert val_top1(probe) > 0.98


def probe_rank(out, comm: Comm) -> None:
    probe, losses = probe_on_blobs(comm)
    (out / f"rank{comm.rank}.pkl").write_bytes(pickle.dumps((probe.state_dict(), losses)))


def test_linear_probe_trains_with_ddp_across_two_ranks(tmp_path):
    spawn_ranks(functools.partial(probe_rank, tmp_path), 2)
    (state0, losses0), (state1, losses1) = (pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes())
                                            for r in (0, 1))
    # one probe: DDP averaged the gradients, the ranks end with rank 0's BatchNorm statistics
    assert all(torch.equal(state0[k], state1[k]) for k in state0)
    assert losses0 == losses1 and losses0[-1] < losses0[0]  # the loss of both ranks' images
    probe = LinearProbe(channels=32, size=1, pooled_dim=9000, n_classes=N_CLASSES)
    probe.load_state_dict(state0)
    assert val_top1(probe) > 0.98


@pytest.mark.parametrize("channels, size, expected_dim", [
    (96, 55, 9600), (256, 27, 9216), (384, 13, 9600), (256, 13, 9216),  # the reference's
    (512, 1, 512),  # a map smaller than the target is kept whole
])
def test_pooling_gives_the_reference_dimensions_on_alexnet(channels, size, expected_dim):
    side = pooled_side(channels, size, 9000)
    assert channels * side * side == expected_dim
    probe = LinearProbe(channels, size, 9000, n_classes=3)
    assert probe(torch.randn(2, channels, size, size)).shape == (2, 3)


def test_clusters_score_one_on_features_that_encode_the_labels():
    labels = np.random.default_rng(0).integers(0, N_CLASSES, 1000)
    features = np.eye(N_CLASSES, dtype=np.float32)[labels]
    scores = kmeans_scores(features, labels, 0, Comm(SINGLE), torch.device("cpu"),
                           kmeans_device="cpu")
    assert scores == {"nmi": pytest.approx(1.0), "acc": pytest.approx(1.0)}


def test_clusters_score_chance_on_random_features():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, N_CLASSES, 2000)
    features = rng.standard_normal((2000, 64)).astype(np.float32)
    scores = kmeans_scores(features, labels, 0, Comm(SINGLE), torch.device("cpu"),
                           kmeans_device="cpu")
    assert scores["nmi"] < 0.03 and scores["acc"] < 0.15
