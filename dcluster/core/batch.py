"""The training batch a run uses on this many processes, and its learning rate.

Why a module of its own: a paper states one batch and one lr for the whole job. Spread over 1, 8
or 32 GPUs, the same preset must train at that batch and lr, or its results are not the
paper's; so the per-process batch is derived here from ``optim.global_batch`` (divided over
the ranks) or, when that is 0, is ``optim.batch_size`` as before (the global batch then grows
with the processes, and ``optim.lr_scaling`` says whether the lr follows).
"""
from __future__ import annotations

from dataclasses import dataclass

from dcluster.core.config import ConfigError, OptimConfig


@dataclass(frozen=True)
class BatchPlan:
    """What the training passes of one run use: the same on every rank."""
    global_batch: int  # images per optimiser step, summed over the processes
    per_process: int
    world_size: int
    lr: float  # the lr the optimisers start from
    rule: str  # where the numbers come from, for the log line

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.per_process} per process x "
                f"{self.world_size} process(es), lr {self.lr:g} ({self.rule})")


def plan_batch(optim: OptimConfig, world_size: int) -> BatchPlan:
    """The batch and lr of a job of ``world_size`` processes; a ConfigError (naming
    optim.global_batch) when the global batch cannot be divided equally over them."""
    if optim.global_batch:
        if optim.global_batch % world_size:
            raise ConfigError(f"config key 'optim.global_batch' = {optim.global_batch}: must be "
                              f"a multiple of the {world_size} processes of this job (each "
                              "takes an equal share)")
        return BatchPlan(optim.global_batch, optim.global_batch // world_size, world_size,
                         optim.lr, "optim.global_batch divided over the processes")
    scale = world_size if optim.lr_scaling == "linear" else 1
    return BatchPlan(optim.batch_size * world_size, optim.batch_size, world_size,
                     optim.lr * scale, f"optim.batch_size per process, lr scaling "
                     f"{optim.lr_scaling}")
