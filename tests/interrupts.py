"""Test-only patches of one training process: interrupt it with a real signal at a chosen
point of the epoch loop, and record which images its training passes were given.

Used by tests/rank_main.py (local processes) and by the Slurm tests (inside the submitted
job), so both interrupt at exactly the same places. The product has no switch for this; the
patches wrap the functions the DeepCluster epoch (dcluster/methods/deepcluster/method.py) calls, the
pipelines the harness builds (training batches, for every method), the report's assignments
file and the checkpoint's commit marker.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import dcluster.core.config
import dcluster.methods.deepcluster.method
import dcluster.methods.deepclusterv2.method
import dcluster.harness
import dcluster.runtime.checkpoint
from dcluster.runtime.checkpoint import SIDECAR_SUFFIX, checkpoint_name

STAGES = ("startup", "features", "clustering", "train", "report", "checkpoint")


def parse_point(text: str) -> tuple[str, int, int]:
    """'startup:0', 'features:N', 'clustering:N', 'train:E:B', 'report:E' or 'checkpoint:E'
    as (stage, N or E, B). startup: as `dcluster train` reads its config, before the run
    handles stop signals. N counts this process's DeepCluster feature passes / clusterings
    (DeepCluster-v2's bank passes)
    from 0; E is the epoch, counted from 0 (the log's epoch E + 1), and B (from 1) the
    training batch this process was given in that epoch (counted over all the epoch's
    training passes: MMDC has two). report: inside epoch E's report, its line logged and its
    metrics handed to the tracker, its assignments file not yet written. checkpoint: inside
    the writing of the checkpoint after epoch E (ckpt_e<E + 1>_i0000000.pt), its data file
    complete and its commit marker (the .sha256 sidecar) not yet written."""
    stage, epoch, *batch = text.split(":")
    if stage not in STAGES or (stage == "train") != bool(batch):
        raise ValueError(f"interrupt point {text!r}: want startup:0, features:E, clustering:E, "
                         "train:E:B, report:E or checkpoint:E")
    return stage, int(epoch), int(batch[0]) if batch else 0


def interrupt_at(text: str, send: Callable[[], None]) -> None:
    """Call ``send()`` (which delivers the signal) once, at ``text``'s point (parse_point).
    On a run that starts fresh, feature pass and clustering N are those of epoch N."""
    stage, epoch, batch = parse_point(text)
    calls = {"features": 0, "clustering": 0}

    def counting(name: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            if stage == name and calls[name] == epoch:
                send()
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    if stage == "startup":
        _call_first(dcluster.core.config, "load_config", lambda *args, **kwargs: send())
    method = dcluster.methods.deepcluster.method
    method.extract_features = counting("features", method.extract_features)
    method.kmeans = counting("clustering", method.kmeans)
    # DeepCluster-v2's feature pass: the bank's missing rows, one per epoch
    v2 = dcluster.methods.deepclusterv2.method
    v2.extract_features = counting("features", v2.extract_features)
    if stage == "train":
        _wrap_train_batches(lambda e, b: e == epoch and b == batch and send())
    if stage == "report":  # the harness numbers an epoch's assignments file from 1
        _call_first(dcluster.harness, "save_assignments",
                    lambda run, number, labels: number == epoch + 1 and send())
    if stage == "checkpoint":
        marker = f"{checkpoint_name(epoch + 1, 0)}{SIDECAR_SUFFIX}"
        _call_first(dcluster.runtime.checkpoint, "atomic_write_bytes",
                    lambda path, data: Path(path).name == marker and send())


def _call_first(module: ModuleType, name: str, before: Callable[..., object]) -> None:
    """Make ``module.name(...)`` call ``before(...)`` with the same arguments first."""
    function = getattr(module, name)

    def wrapper(*args, **kwargs):
        before(*args, **kwargs)
        return function(*args, **kwargs)

    setattr(module, name, wrapper)


def record_orders(directory: Path, rank: int) -> None:
    """Append the global indices of every training batch this process is given to
    ``directory/rank<R>-epoch<E>.txt``, one line per batch, and a line to
    ``directory/clusterings-rank<R>.txt`` for every DeepCluster clustering it runs."""
    directory.mkdir(parents=True, exist_ok=True)
    def note(epoch: int, _: int, indices) -> None:
        with open(directory / f"rank{rank}-epoch{epoch}.txt", "a") as out:
            out.write(" ".join(map(str, indices.tolist())) + "\n")

    _wrap_train_batches(lambda e, b: None, note)
    kmeans = dcluster.methods.deepcluster.method.kmeans

    def noting_clustering(*args, **kwargs):
        result = kmeans(*args, **kwargs)
        with open(directory / f"clusterings-rank{rank}.txt", "a") as out:
            out.write(f"{result.backend}\n")
        return result

    dcluster.methods.deepcluster.method.kmeans = noting_clustering


def clusterings(directory: Path, rank: int = 0) -> int:
    """How many clusterings the processes recording into ``directory`` have run."""
    path = directory / f"clusterings-rank{rank}.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wrap_train_batches(before: Callable[[int, int], object],
                        after: Callable[[int, int, object], None] = lambda *a: None) -> None:
    """Wrap the pipelines the harness builds so that each training batch passes
    ``before(epoch, batch number)`` first and ``after(epoch, number, indices)`` once handed
    over."""
    build_pipelines = dcluster.harness.build_pipelines

    def patched(*args, **kwargs):
        return _Watched(build_pipelines(*args, **kwargs), before, after)

    dcluster.harness.build_pipelines = patched


class _Watched:
    """A Pipelines whose training batches are watched; everything else is the original's."""

    def __init__(self, pipelines, before, after) -> None:
        self._pipelines = pipelines
        self._before = before
        self._after = after
        self._numbers: dict[int, int] = {}  # epoch -> training batches given so far

    def __getattr__(self, name: str):
        return getattr(self._pipelines, name)

    def train_batches(self, order, epoch: int, batch_size: int,
                      start_position: int = 0) -> Iterator:
        for batch in self._pipelines.train_batches(order, epoch, batch_size, start_position):
            number = self._numbers[epoch] = self._numbers.get(epoch, 0) + 1
            self._before(epoch, number)
            self._after(epoch, number, batch.indices)
            yield batch


def signal_self(signum: int) -> Callable[[], None]:
    return lambda: os.kill(os.getpid(), signum)
