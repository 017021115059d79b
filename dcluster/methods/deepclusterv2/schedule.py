"""DeepCluster-v2's learning rate: a linear warm-up, then a cosine decay (swav's
main_deepclusterv2.py, which builds the same values as one array over all steps).

A pure function of the global step, so that a resumed run needs no scheduler state: the
step it resumes at gives the lr, exactly as the uninterrupted run had it.
"""
from __future__ import annotations

import math


def lr_at(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: int,
          start_warmup: float, base_lr: float, final_lr: float) -> float:
    """The lr of global step ``step`` (0-based, ``epoch * steps_per_epoch + iteration``).

    Warm-up: ``warmup_epochs * steps_per_epoch`` steps evenly spaced from ``start_warmup``
    to ``base_lr``, both included (numpy's ``linspace``, as swav). Then, over the remaining
    T steps, t = 0..T-1: ``final_lr + (base_lr - final_lr) * (1 + cos(pi * t / T)) / 2``;
    the last step thus comes within one step's decrement of ``final_lr``, as swav's does."""
    warmup = warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch
    if not 0 <= step < total:
        raise ValueError(f"step {step} is outside the run's {total} steps")
    if step < warmup:
        if warmup == 1:
            return start_warmup
        return start_warmup + (base_lr - start_warmup) * step / (warmup - 1)
    t, decay = step - warmup, total - warmup
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * t / decay))
