"""Whole passes of a loader collected into tensors, and the bad-file checks every loader
must pass, shared by the loader tests."""
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from dcluster.data import TooManyBadImagesError
from images import write_photo_tree, write_text_as_jpg, write_truncated_jpeg, write_zero_byte


def feature_pass(pipes, indices, batch_size=4):
    batches = list(pipes.feature_batches(indices, batch_size))
    return torch.cat([b.images for b in batches]), torch.cat([b.indices for b in batches]), batches


def train_pass(pipes, order, epoch, batch_size=4, start_position=0):
    batches = list(pipes.train_batches(order, epoch, batch_size, start_position))
    return (torch.cat([b.images for b in batches]), torch.cat([b.indices for b in batches]),
            batches)


# the unreadable files every loader must skip, by path in the tree, with what its reason says
BAD_FILES = {"a/000_zero.jpg": ("empty", write_zero_byte),
             "a/100_truncated.jpg": ("truncated", write_truncated_jpeg),
             "b/050_text.jpg": ("cannot identify", write_text_as_jpg)}


def write_tree_with_bad_files(root: Path, extra: Optional[dict[str, tuple[str, Callable]]] = None
                              ) -> tuple[Path, dict[str, str]]:
    """Eight photos in two classes plus BAD_FILES (and a loader's own ``extra`` ones):
    the tree and {relative path: reason}."""
    write_photo_tree(root, {"a": 4, "b": 4})
    bad = {**BAD_FILES, **(extra or {})}
    for rel, (_, write) in bad.items():
        write(root / rel)
    return root, {rel: reason for rel, (reason, _) in bad.items()}


def assert_bad_files_skipped(pipes, root: Path, bad: dict[str, str], got: torch.Tensor,
                             caplog) -> None:
    """After a feature pass over every image: each bad file left out, counted, and listed
    with its path and reason (in the pipelines' record and the log)."""
    bad_indices = {pipes.source.relpaths.index(rel) for rel in bad}
    assert got.tolist() == [i for i in range(len(pipes.source)) if i not in bad_indices]
    assert set(pipes.bad_indices) == bad_indices
    for rel, reason in bad.items():
        description = pipes.bad_indices[pipes.source.relpaths.index(rel)]
        assert str(root / rel) in description and reason in description.lower()
    assert f"{len(bad)} unreadable images skipped" in caplog.text


def assert_too_many_bad_files_stop_the_pass(pipes, root: Path) -> None:
    """With one bad image allowed, a pass over every image stops at the second, naming both."""
    n = len(pipes.source)
    with pytest.raises(TooManyBadImagesError) as err:
        list(pipes.feature_batches(list(range(n)), 4))
    message = str(err.value)
    assert "2 unreadable images" in message and f"over {n} images" in message
    assert str(root / "a/000_zero.jpg") in message and str(root / "a/100_truncated.jpg") in message
