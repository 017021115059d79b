"""Where this process sits in the job: rank, world size, device.

Only the single-process case exists so far; every stage already receives an `Env` and decides
its rank-0-only duties from it, so that multi-process launch changes this module, not them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("dcluster.distributed")


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, MLflow records, plots and progress bars."""
        return self.rank == 0


def detect_env() -> Env:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    env = Env(rank=0, world_size=1, local_rank=0, device=device)
    log.info("single process on %s", device)
    return env
