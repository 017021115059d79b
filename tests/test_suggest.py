"""Closest names by edit distance: the nearest, ties kept, nothing for a name unlike all."""
from dcluster.core.suggest import closest, edit_distance

KEYS = ["optim.lr", "optim.lr_scaling", "optim.batch_size", "eval.linear.lr", "data.path"]


def test_edit_distance_counts_insertions_deletions_and_substitutions():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("optim.lr_scale", "optim.lr_scaling") == 3


def test_closest_keeps_only_the_nearest_and_ties():
    assert closest("optim.lr_scale", KEYS) == ["optim.lr_scaling"]
    assert closest("lr", KEYS) == ["optim.lr", "eval.linear.lr"]  # the section left out
    assert closest("data.paht", KEYS) == ["data.path"]
    assert closest("zzzz", KEYS) == []
