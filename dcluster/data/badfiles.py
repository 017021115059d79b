"""The bad-image budget: skip and report unreadable images, stop when there are too many.

A handful of broken files in a million should not cost a run, but a dataset that is mostly
unreadable (wrong mount, half-synced copy) should stop it at once rather than train on the
rest. The budget is a fraction of the images one pass will visit, known before it starts, so
the pass can fail on the first image over budget instead of discovering it at the end.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Callable, NamedTuple, TypeVar, Union

from dcluster.data.decode import BadImageError
from dcluster.core.errors import UserError

if TYPE_CHECKING:
    from dcluster.data.source import ImageSource

log = logging.getLogger("dcluster.data")
T = TypeVar("T")

_NAMED_IN_ERROR = 20


class TooManyBadImagesError(RuntimeError, UserError):
    """More images of one pass could not be read than ``data.max_bad_fraction`` allows."""


class Unreadable(NamedTuple):
    """An image a loader could not read: the marker its workers hand back instead of raising,
    so that only the process that sees the whole pass does the counting."""
    index: int
    path: str
    reason: str


def load_or_unreadable(source: "ImageSource", index: int,
                       load: Callable[[bytes, int, str], T]) -> Union[T, Unreadable]:
    """``load(bytes, index, path)`` of one image, or Unreadable if the bytes cannot be read
    or ``load`` raises BadImageError."""
    path = source.describe(index)
    try:
        return load(source.read_bytes(index), index, path)
    except BadImageError as err:
        return Unreadable(index, path, err.reason)
    except OSError as err:  # vanished file, permissions, I/O error on the mount
        return Unreadable(index, path, f"cannot read: {err}")


class BadImageBudget:
    """Counts the bad images of one pass of ``total`` images and enforces the budget.

    ``known`` (global index -> "path: reason"), shared between passes, is where new bad
    images are recorded; an image already in it is not logged again, which keeps repeats in a
    training order (and the re-read in every epoch) from flooding the log.
    """

    def __init__(self, total: int, max_fraction: float, known: dict[int, str]) -> None:
        self.allowed = math.floor(max_fraction * total)
        self.total = total
        self.max_fraction = max_fraction
        self.known = known
        self.failures: dict[int, str] = {}  # this pass's bad images, in the order met

    def record_all(self, unreadable: list[Unreadable]) -> None:
        for bad in unreadable:
            self.record(bad.index, bad.path, bad.reason)

    def log_summary(self) -> None:
        if self.failures:
            log.warning("%d unreadable images skipped in a pass over %d images",
                        len(self.failures), self.total)

    def record(self, index: int, path: str, reason: str) -> None:
        description = f"{path}: {reason}"
        if index not in self.known:
            log.warning("skipping unreadable image %s (index %d)", description, index)
            self.known[index] = description
        self.failures[index] = description
        if len(self.failures) > self.allowed:
            named = "\n  ".join(list(self.failures.values())[:_NAMED_IN_ERROR])
            more = len(self.failures) - _NAMED_IN_ERROR
            raise TooManyBadImagesError(
                f"{len(self.failures)} unreadable images in a pass over {self.total} images, "
                f"more than data.max_bad_fraction={self.max_fraction} allows ({self.allowed}):"
                f"\n  {named}" + (f"\n  ... and {more} more" if more > 0 else "")
            )
