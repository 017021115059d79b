"""The bad-image budget: skip and report unreadable images, stop when there are too many.

A handful of broken files in a million should not cost a run, but a dataset that is mostly
unreadable (wrong mount, half-synced copy) should stop it at once rather than train on the
rest. The budget is a fraction of the images one pass will visit, known before it starts, so
the pass can fail on the first image over budget instead of discovering it at the end.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger("dcluster.data")

_NAMED_IN_ERROR = 20


class TooManyBadImagesError(RuntimeError):
    """More images of one pass could not be read than ``data.max_bad_fraction`` allows."""


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
