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

    def filter(self, record: logging.LogRecord) -> bool:
        """A progress line that a tqdm bar shows already stays off the terminal."""
        return not getattr(record, UNDER_BAR, False) and super().filter(record)


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
             enabled: bool = True, log_every_s: float = 30.0,
             unit: str = "batches") -> Iterator[T]:
    """Yield `items` with a tqdm bar (mode 'always', or 'auto' on a terminal) and a log line
    with the rate and the time left every `log_every_s` seconds; silent where `enabled` is
    False (non-zero ranks) or mode is 'never'. Under a bar the lines go to the log's other
    handlers only (train.log), not to the terminal the bar is drawn on."""
    if not enabled or mode == "never":
        yield from items
        return
    bar = mode == "always" or (mode == "auto" and sys.stderr.isatty())
    shown = tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True) if bar else items
    start = last = time.monotonic()
    for done, item in enumerate(shown, 1):
        yield item
        now = time.monotonic()
        if now - last >= log_every_s:
            last = now
            log.info("%s", progress_line(desc, done, total, now - start, unit),
                     extra={UNDER_BAR: bar})


UNDER_BAR = "dcluster_under_bar"
"""Set on a progress record that a tqdm bar already shows on the terminal."""


def progress_line(desc: str, done: int, total: Optional[int], elapsed: float,
                  unit: str = "batches") -> str:
    """E.g. 'features: 1200/5000 batches (31.2/s, 2m02s left)'."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if not total or rate <= 0:
        return f"{desc}: {done}/? {unit} ({rate:.1f}/s)"
    return f"{desc}: {done}/{total} {unit} ({rate:.1f}/s, {clock_text(max(total - done, 0) / rate)} left)"


def clock_text(seconds: float) -> str:
    """'1h02m', '2m02s' or '12s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
