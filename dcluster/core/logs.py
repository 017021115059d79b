"""Logging set-up and progress reporting.

Progress bars are for people at a terminal; a batch job's log wants periodic plain lines it can
grep. `progress()` picks one from the config and the stream, and only on the process that is
allowed to talk (rank 0), so N ranks don't print N interleaved bars.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, Optional, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("dcluster")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes, not the one it was created with:
    a caller that swaps stderr (pytest's capture, a notebook) still gets the records."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Send `dcluster.*` records to stderr at ``level``; one handler however often it is
    called (tests and in-process callers call it again)."""
    log.setLevel(level)
    log.propagate = False
    if any(getattr(h, "_dcluster", False) for h in log.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    handler._dcluster = True  # type: ignore[attr-defined]
    log.addHandler(handler)


def progress(items: Iterable[T], total: Optional[int], desc: str, mode: str,
             enabled: bool = True, log_every_s: float = 30.0) -> Iterator[T]:
    """Yield `items` with a tqdm bar (mode 'always', or 'auto' on a terminal) or with a log
    line every `log_every_s` seconds; silent where `enabled` is False (non-zero ranks)."""
    if not enabled or mode == "never":
        yield from items
        return
    if mode == "always" or (mode == "auto" and sys.stderr.isatty()):
        yield from tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= log_every_s:
            last = now
            rate = done / (now - start)
            log.info("%s: %d/%s batches (%.1f/s)", desc, done, total if total else "?", rate)
