"""The balanced sampler: uniform over clusters, deterministic, rank slices that partition."""
import numpy as np
import pytest

from dcluster.runtime.sampler import balanced_order, rank_slice


@pytest.fixture(scope="module")
def skewed_labels() -> np.ndarray:
    """Zipf-like sizes (one huge cluster, singletons), some excluded images, empty ids."""
    rng = np.random.default_rng(0)
    sizes = [5000, 700, 40, 3, 1, 1, 0, 12]
    labels = np.repeat(np.arange(len(sizes)) * 3, sizes)  # ids 0, 3, 6, ...: gaps are empty
    labels[rng.choice(labels.size, 50, replace=False)] = -1
    return rng.permutation(labels)


@pytest.mark.parametrize("num_samples", [None, 1000, 7, 100_000])
def test_per_cluster_counts_are_uniform_within_one(skewed_labels, num_samples):
    order = balanced_order(skewed_labels, seed=1, epoch=0, num_samples=num_samples)
    expected_len = int((skewed_labels >= 0).sum()) if num_samples is None else num_samples
    assert order.dtype == np.int64 and order.shape == (expected_len,)
    nonempty = np.unique(skewed_labels[skewed_labels >= 0])
    counts = np.array([(skewed_labels[order] == c).sum() for c in nonempty])
    assert counts.max() - counts.min() <= 1, counts
    assert counts.sum() == expected_len


def test_excluded_images_are_never_drawn(skewed_labels):
    order = balanced_order(skewed_labels, seed=3, epoch=2, num_samples=50_000)
    assert (skewed_labels[order] >= 0).all()


def test_without_replacement_when_a_cluster_is_large_enough(skewed_labels):
    order = balanced_order(skewed_labels, seed=0, epoch=0, num_samples=70)  # 10 per cluster
    for c in np.unique(skewed_labels[skewed_labels >= 0]):
        drawn = order[skewed_labels[order] == c]
        if (skewed_labels == c).sum() >= 10:
            assert len(np.unique(drawn)) == len(drawn)
        else:  # small clusters are drawn with replacement, from their own images
            assert set(drawn) <= set(np.flatnonzero(skewed_labels == c))


def test_deterministic_per_seed_and_epoch(skewed_labels):
    np.random.seed(123)
    a = balanced_order(skewed_labels, seed=5, epoch=4)
    np.random.seed(999)  # the global RNG must not matter
    np.random.random(10)
    b = balanced_order(skewed_labels, seed=5, epoch=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, balanced_order(skewed_labels, seed=5, epoch=5))
    assert not np.array_equal(a, balanced_order(skewed_labels, seed=6, epoch=4))


def test_no_labelled_image_is_an_error():
    with pytest.raises(ValueError, match="no labelled image"):
        balanced_order(np.full(4, -1), seed=0, epoch=0)


@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_slices_partition_with_equal_length(n, world_size):
    order = np.random.default_rng(n).permutation(n).astype(np.int64)
    slices = [rank_slice(order, r, world_size) for r in range(world_size)]
    assert len({len(s) for s in slices}) == 1
    usable = n - n % world_size
    assert sum(len(s) for s in slices) == usable
    np.testing.assert_array_equal(np.sort(np.concatenate(slices)), np.sort(order[:usable]))
    with pytest.raises(ValueError, match="rank"):
        rank_slice(order, world_size, world_size)
