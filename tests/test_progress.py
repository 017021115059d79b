"""Progress lines: the rate and the time left, in the log; off the terminal under a bar."""
import io
import logging
import sys

from dcluster.core import logs
from dcluster.core.logs import (UNDER_BAR, clock_text, configure_logging, progress,
                                progress_line)


def test_a_progress_line_says_the_rate_and_the_time_left():
    assert progress_line("features", 1200, 5000, 40.0) == \
        "features: 1200/5000 batches (30.0/s, 2m07s left)"
    assert progress_line("k-means (k=10000)", 3, 20, 30.0, unit="iterations") == \
        "k-means (k=10000): 3/20 iterations (0.1/s, 2m50s left)"
    assert progress_line("shards", 5, None, 10.0) == "shards: 5/? batches (0.5/s)"
    assert (clock_text(3725), clock_text(125), clock_text(12)) == ("1h02m", "2m05s", "12s")


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_progress_logs_periodic_lines_without_a_terminal(monkeypatch):
    clock = iter(float(t) for t in range(0, 1000, 20))  # 20 s a step
    monkeypatch.setattr(logs.time, "monotonic", lambda: next(clock))
    kept = Kept()
    configure_logging()
    logs.log.addHandler(kept)
    try:
        assert list(progress(range(4), 4, "features", "auto")) == [0, 1, 2, 3]
    finally:
        logs.log.removeHandler(kept)
    lines = [r.getMessage() for r in kept.records]
    assert lines == ["features: 2/4 batches (0.1/s, 40s left)",
                     "features: 4/4 batches (0.1/s, 0s left)"]


def test_a_progress_line_under_a_bar_stays_off_the_terminal(monkeypatch):
    configure_logging()
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    logs.log.info("shown", extra={UNDER_BAR: False})
    logs.log.info("under the bar", extra={UNDER_BAR: True})
    assert "shown" in stderr.getvalue() and "under the bar" not in stderr.getvalue()
