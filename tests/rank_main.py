"""One rank of a multi-process test job: ``python tests/rank_main.py [options] train ...``.

Runs `dcluster` exactly as ``python -m dcluster`` would, after patching this process only:
the product has no switches that exist for tests. Options:

--fail-on-rank R   rank R raises in its first training epoch (a crash on one rank)
--save-weights DIR each rank saves its model's state after every epoch to DIR/rank<R>.pt
--interrupt POINT  rank 0 sends itself a signal at POINT (tests/interrupts.py: features:N,
                   clustering:N, train:E:B, report:E, checkpoint:E); on a stop signal the job
                   must stop as a whole and checkpoint, SIGKILL ends the process there
--signal NAME      the signal --interrupt sends (default SIGUSR2)
--record-orders DIR each rank lists the images of its training batches (tests/interrupts.py)
--row-gather-bound N  a gather of rows wider than a label (Comm.gather_rows) of more than N
                   rows in all fails the process (tests/test_sharded_eval.py)
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

import dcluster.harness
from dcluster.cli import main
from dcluster.parallel.collectives import Comm
from interrupts import interrupt_at, record_orders, signal_self


def fail_in_training(*args, **kwargs):
    raise RuntimeError(f"injected failure on rank {os.environ['RANK']}")


def bounded_gather(bound: int, gather_rows):
    def gather(self, rows, counts, out=None):
        if rows.ndim > 1 and sum(counts) > bound:
            raise AssertionError(f"gather of {sum(counts)} rows of {tuple(rows.shape[1:])} "
                                 f"on rank {self.rank} (bound {bound})")
        return gather_rows(self, rows, counts, out)

    return gather


def saving_weights(directory: Path, align):
    def align_then_save(model, comm) -> None:
        align(model, comm)
        torch.save(model.state_dict(), directory / f"rank{comm.rank}.pt")

    return align_then_save


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-on-rank", type=int)
    parser.add_argument("--save-weights", type=Path)
    parser.add_argument("--interrupt")
    parser.add_argument("--signal", default="SIGUSR2", type=lambda name: signal.Signals[name])
    parser.add_argument("--record-orders", type=Path)
    parser.add_argument("--row-gather-bound", type=int)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.fail_on_rank is not None and int(os.environ["RANK"]) == args.fail_on_rank:
        dcluster.harness.run_pass = fail_in_training  # every method's passes
    if args.save_weights is not None:
        # the harness aligns the replicas after every epoch's last pass, whatever the method
        dcluster.harness.align_replicas = saving_weights(args.save_weights,
                                                         dcluster.harness.align_replicas)
    if args.row_gather_bound is not None:
        Comm.gather_rows = bounded_gather(args.row_gather_bound, Comm.gather_rows)
    rank = int(os.environ.get("RANK", "0"))
    if args.interrupt and rank == 0:
        interrupt_at(args.interrupt, signal_self(args.signal))
    if args.record_orders is not None:
        record_orders(args.record_orders, rank)
    sys.exit(main(args.argv))
