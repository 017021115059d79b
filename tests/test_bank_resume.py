"""DeepCluster on the feature bank (clustering.features=training_pass) in real two-rank
`dcluster train` runs: every bank row was last taken in from the rank that last trained on
its image, and a stop in the middle of an epoch, with the bank partly rewritten and rows
still in the ranks' outboxes, resumes to the uninterrupted run's weights, labels and bank
(rows blended with the default momentum, so the order they are taken in shows)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dcluster.runtime.checkpoint import load_checkpoint, shard_path
from dcluster.parallel.distributed import shard_bounds
from dcluster.runtime.feature_bank import STAMP_EPOCH, stamp_epoch
from ranks import describe
from reference_runs import (BANK, EPOCHS, IMAGES, Run, assert_same_run, new_dir, orders_of,
                            run_pair, train_args)

LAST = EPOCHS - 1  # the last epoch, counted from 0 as the recorded orders are


def bank_rows(checkpoint: Path) -> tuple[np.ndarray, torch.Tensor]:
    """The stamps and rows of the whole bank, from its two shard files."""
    payload = load_checkpoint(checkpoint, with_shards=True)
    shards = [torch.load(shard_path(checkpoint, "bank", r), weights_only=False) for r in range(2)]
    assert [s["file"] for s in payload["bank"]["shards"]] == [
        shard_path(checkpoint, "bank", r).name for r in range(2)]
    assert [(s["lo"], s["hi"]) for s in shards] == [
        tuple(shard_bounds(IMAGES, 2)[r:r + 2]) for r in range(2)]
    return (np.concatenate([s["stamps"] for s in shards]),
            torch.cat([s["rows"] for s in shards]))


def test_every_bank_row_is_stamped_by_the_rank_that_last_trained_on_its_image(
        bank_pair_reference):
    stamps, rows = bank_rows(bank_pair_reference.checkpoint(EPOCHS))
    orders = orders_of(bank_pair_reference.orders)
    batches = [[list(map(int, line.split())) for line in orders[f"rank{r}-epoch{LAST}.txt"]]
               for r in range(2)]
    last_draw: dict[int, tuple[int, int]] = {}  # image -> (iteration, rank) of its last draw
    for iteration in range(max(map(len, batches))):
        for rank in range(2):
            for index in (batches[rank][iteration] if iteration < len(batches[rank]) else []):
                last_draw[index] = (iteration, rank)
    assert 0 < len(last_draw) < IMAGES, "the balanced sampler leaves images undrawn"
    for index in range(IMAGES):
        if index in last_draw:
            iteration, rank = last_draw[index]
            assert stamps[index] == LAST * STAMP_EPOCH + 1 + iteration * 2 + rank, index
        else:  # not drawn in the last epoch: computed before it, refreshed at most 1 epoch ago
            assert LAST - 1 <= stamp_epoch(stamps[index]) <= LAST, index
    assert rows.shape[0] == IMAGES and torch.isfinite(rows).all()


def assert_resumes_to(reference: Run, run: Run, args: list[str], tmp: Path) -> None:
    """The stopped ``run`` resumed by the same command ends with ``reference``'s weights,
    labels, orders and bank."""
    resumed = run_pair(["--record-orders", str(run.orders)], args, tmp / "resumed")
    assert [o.returncode for o in resumed] == [0, 0], describe(resumed)
    assert_same_run(reference, run)
    want_stamps, want_rows = bank_rows(reference.checkpoint(EPOCHS))
    got_stamps, got_rows = bank_rows(run.checkpoint(EPOCHS))
    assert np.array_equal(got_stamps, want_stamps)
    assert torch.equal(got_rows, want_rows)


def test_two_ranks_stopped_mid_epoch_resume_to_the_uninterrupted_weights_and_bank(
        bank_pair_reference, digits_subset, tmp_path):
    args = train_args(digits_subset, tmp_path / "runs", "bank_stopped", *BANK)
    run = Run(tmp_path / "runs" / "bank_stopped", new_dir(tmp_path / "orders"))
    stopped = run_pair(["--interrupt", "train:1:7", "--record-orders", str(run.orders)], args,
                       tmp_path / "stopped")
    assert [o.returncode for o in stopped] == [140, 140], describe(stopped)
    checkpoint = run.checkpoint(1, 8)
    assert run.checkpoint_names()[-1] == checkpoint.name
    # the mid-epoch checkpoint holds the bank partly rewritten by epoch 1's first 7 steps
    stamps, _ = bank_rows(checkpoint)
    trained = (stamps % STAMP_EPOCH) != 0
    assert (trained & (stamp_epoch(stamps) == 1)).any(), "rows of epoch 1's training steps"
    assert (trained & (stamp_epoch(stamps) == 0)).any(), "rows of epoch 0's still to replace"

    assert_resumes_to(bank_pair_reference, run, args, tmp_path)


def test_two_ranks_stopped_at_the_start_of_an_epoch_resume_to_the_uninterrupted_weights(
        bank_pair_reference, digits_subset, tmp_path):
    """SIGTERM (Slurm's preemption signal) during epoch 2's clustering: the stop is taken
    before the epoch's first training step, when no rank's outbox holds a row yet; the
    checkpoint's flush then exchanges empty outboxes."""
    args = train_args(digits_subset, tmp_path / "runs", "bank_stopped_start", *BANK)
    run = Run(tmp_path / "runs" / "bank_stopped_start", new_dir(tmp_path / "orders"))
    stopped = run_pair(["--interrupt", "clustering:1", "--signal", "SIGTERM",
                        "--record-orders", str(run.orders)], args, tmp_path / "stopped")
    assert [o.returncode for o in stopped] == [143, 143], describe(stopped)
    assert run.checkpoint_names()[-1] == run.checkpoint(1, 1).name

    assert_resumes_to(bank_pair_reference, run, args, tmp_path)
