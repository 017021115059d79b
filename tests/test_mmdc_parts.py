"""MMDC's parts: target sampling, the Hungarian re-assignment, rotation labels, refinement
label matching."""
import numpy as np
import pytest
import torch

from dcluster.methods.mmdc.config import MMDCConfig
from dcluster.methods.mmdc.assignment import best_permutation, match_labels
from dcluster.methods.mmdc.rotation import rotated_batch
from dcluster.methods.mmdc.targets import TargetBank, mixture_means, nearest_component


def test_onehot_targets_with_sigma_zero_are_the_means_drawn_uniformly():
    bank = TargetBank(20000, MMDCConfig(k=8), seed=3)
    points = bank.points(np.arange(len(bank)))
    assert np.array_equal(points, np.eye(8, dtype=np.float32)[bank.components])
    counts = np.bincount(bank.components, minlength=8)
    # Categorical(1/K): each count is Binomial(n, 1/8), std ~ 47; 5 std is a loose bound
    assert np.all(np.abs(counts - 20000 / 8) < 5 * np.sqrt(20000 / 8 * 7 / 8))


def test_gaussian_targets_lie_on_the_sphere_around_their_component():
    cfg = MMDCConfig(k=5, dim=16, means="uniform", sigma=0.05)
    bank = TargetBank(3000, cfg, seed=0)
    means = mixture_means(cfg, seed=0)
    assert np.allclose(np.linalg.norm(means, axis=1), 1.0, atol=1e-6)
    points = bank.points(np.arange(3000))
    assert np.allclose(np.linalg.norm(points, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(nearest_component(points, means), bank.components)
    for c in range(5):  # spread of a component: sigma per coordinate, before projection
        spread = points[bank.components == c] - means[c]
        assert 0.03 < spread.std(axis=0).mean() < 0.07
        assert np.abs(spread.mean(axis=0)).max() < 0.02
    # a point depends on its id and the seed only: any batch, any order, same values
    ids = np.array([2999, 7, 1500])
    assert np.array_equal(bank.points(ids), points[ids])
    assert not np.array_equal(TargetBank(3000, cfg, seed=1).points(ids), points[ids])


def assignment_cost(embeddings: np.ndarray, points: np.ndarray) -> float:
    """Total Euclidean distance between each row and its target: what the permutation minimises."""
    return float(np.linalg.norm(embeddings - points, axis=1).sum())


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_step_never_increases_cost_and_keeps_a_permutation(seed):
    rng = np.random.default_rng(seed)
    bank = TargetBank(500, MMDCConfig(k=10, sigma=0.3), seed=seed)
    assignment = rng.permutation(500)
    for batch in np.array_split(rng.permutation(500), 8):  # one epoch of disjoint batches
        ids = assignment[batch]
        points = bank.points(ids)
        embedded = rng.standard_normal(points.shape).astype(np.float32)
        embedded /= np.linalg.norm(embedded, axis=1, keepdims=True)
        perm = best_permutation(embedded, points)
        assert sorted(perm) == list(range(len(batch)))
        assert assignment_cost(embedded, points[perm]) <= assignment_cost(embedded, points) + 1e-5
        assignment[batch] = ids[perm]
    assert np.array_equal(np.sort(assignment), np.arange(500))  # every target used once


def test_hungarian_step_finds_the_exact_matching():
    points = np.eye(4, dtype=np.float32)
    embedded = points[[2, 0, 3, 1]] * 0.9
    assert list(best_permutation(embedded, points)) == [2, 0, 3, 1]


def test_refinement_labels_keep_the_previous_numbering():
    previous = np.array([0, 0, 1, 1, 2, 2, 2])
    new = np.array([2, 2, 0, 0, 1, 1, 0])  # the same partition but one image, renumbered
    assert list(match_labels(new, previous, 3)) == [0, 0, 1, 1, 2, 2, 1]


def test_rotation_labels_match_the_rotated_images():
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 0, 0] = 1.0  # a marker in the top-left corner
    image[0, 0, 0, 1] = 0.5  # and its right neighbour, so that every rotation differs
    batch = torch.cat([image, 2 * image])
    rotated, labels = rotated_batch(batch)
    assert rotated.shape == (8, 1, 4, 4) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    corner = {0: (0, 0), 1: (3, 0), 2: (3, 3), 3: (0, 3)}  # counter-clockwise quarter turns
    for i, r in enumerate(labels.tolist()):
        assert rotated[i, 0][corner[r]] == batch[i % 2, 0, 0, 0]
        expected = np.rot90(batch[i % 2, 0].numpy(), r)
        assert np.array_equal(rotated[i, 0].numpy(), expected)
