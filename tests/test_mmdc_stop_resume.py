"""MMDC on the run harness, with real `dcluster train` processes: two gloo ranks train on
disjoint slices of one order, a stop signal mid-epoch (in the clustering pass, and in the
rotation pass of a refinement epoch) checkpoints where the epoch stands, and the same command
then ends with the weights, targets, clusters and training orders of the uninterrupted run;
the same in one process.

The tiny MMDC run (tests/reference_runs.py): 400 digits, batch 32, 1 epoch + 1 refinement
epoch, each of two passes (clustering, rotation): 13 batches a pass in one process, 7 per rank
in two. Signals are sent by rank 0 to itself before a chosen training batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from dcluster.runtime.checkpoint import load_checkpoint
from ranks import describe
from reference_runs import (IMAGES, MMDC_EPOCHS, MMDC_OPTIMIZERS, MMDC_RANK_BATCHES, MMDC_REFINE,
                            Run, assert_same_run, mmdc_train_args, new_dir, orders_of, start_run)

EPOCHS = MMDC_EPOCHS + MMDC_REFINE


def test_two_ranks_train_on_disjoint_slices_of_every_pass(mmdc_pair_reference):
    orders = orders_of(mmdc_pair_reference.orders)
    for epoch in range(EPOCHS):
        ranks = [orders[f"rank{r}-epoch{epoch}.txt"] for r in range(2)]
        assert [len(lines) for lines in ranks] == [2 * MMDC_RANK_BATCHES] * 2  # two passes
        for passes in (slice(0, MMDC_RANK_BATCHES), slice(MMDC_RANK_BATCHES, None)):
            images = [{int(i) for line in lines[passes] for i in line.split()} for lines in ranks]
            assert not images[0] & images[1] and len(images[0] | images[1]) == IMAGES
    final = mmdc_pair_reference.final()
    assert np.array_equal(np.sort(final["targets"]["assignment"]), np.arange(IMAGES))
    assert final["targets"]["refined"].min() >= 0  # the last epoch refined


@dataclass(frozen=True)
class Case:
    ranks: int
    point: str  # where rank 0 sends itself SIGUSR2 (tests/interrupts.py)
    checkpoint: tuple[int, int]  # (epoch, step) it stops with
    stage: int  # the pass under way: 0 clustering, 1 rotation
    resume_log: str


CASES = [
    # two ranks, epoch 0's clustering pass: after its 3rd iteration
    Case(2, "train:0:3", (0, 4), 0, "inside epoch 1, after its iteration 3"),
    # two ranks, the refinement epoch's rotation pass: 7 clustering + 3 rotation iterations
    Case(2, f"train:{MMDC_EPOCHS}:10", (MMDC_EPOCHS, 11), 1,
         f"inside epoch {MMDC_EPOCHS + 1}, after its iteration 10"),
    # one process, epoch 0's clustering pass
    Case(1, "train:0:5", (0, 6), 0, "inside epoch 1, after its iteration 5"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.ranks}ranks-{c.point}" for c in CASES])
def test_a_stopped_mmdc_run_resumes_to_the_uninterrupted_result(case, request, digits_subset,
                                                                tmp_path):
    reference: Run = request.getfixturevalue(
        "mmdc_pair_reference" if case.ranks == 2 else "mmdc_reference")
    name = "stopped"
    args = mmdc_train_args(digits_subset, tmp_path / "runs", name)
    run = Run(tmp_path / "runs" / name, new_dir(tmp_path / "orders"), EPOCHS)

    stopped = start_run(case.ranks, args, run.orders, tmp_path / "stopped", interrupt=case.point)
    assert [o.returncode for o in stopped] == [140] * case.ranks, describe(stopped)
    epoch, step = case.checkpoint
    checkpoint = run.checkpoint(epoch, step)
    assert run.checkpoint_names()[-1] == checkpoint.name, run.checkpoint_names()
    payload = load_checkpoint(checkpoint)
    in_epoch = payload["in_epoch"]
    assert (payload["epoch"], payload["iteration"], in_epoch["stage"]) == (epoch, step, case.stage)
    assert len(in_epoch["ranks"]) == case.ranks
    # the targets merged from every rank's own images: still a permutation of the draws
    assert np.array_equal(np.sort(payload["targets"]["assignment"]), np.arange(IMAGES))

    resumed = start_run(case.ranks, args, run.orders, tmp_path / "resumed")
    assert [o.returncode for o in resumed] == [0] * case.ranks, describe(resumed)
    assert f"resuming from {checkpoint.resolve()} {case.resume_log}" in resumed[0].output, \
        resumed[0].output[-4000:]
    assert_same_run(reference, run, MMDC_OPTIMIZERS)
