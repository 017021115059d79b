"""Everything an MMDC run carries from one epoch to the next, and its round trip through a
checkpoint: DeepCluster's run state (run_state.py: the same files, checks and RNG capture)
plus which image holds which target.

The target points themselves are not stored: they are a function of (seed, mmdc.*, number of
images) (targets.TargetBank). What training changes is the permutation `assignment` and,
during refinement, the component each image is pulled to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from dcluster.checkpoint import capture_rng_state, restore_rng_state
from dcluster.run_state import RunState, check_compatible, record, restored


@dataclass
class MMDCState(RunState):
    """``labels``: the nearest mixture component of each image (-1 unreadable)."""
    assignment: Optional[np.ndarray] = None  # int64 (N,): target id of each image, a permutation
    refined: Optional[np.ndarray] = None  # int64 (N,): component pulled to, refinement stage


def pack(state: MMDCState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         config_hash: str, data_fingerprint: str) -> dict[str, Any]:
    return {
        **record(state, config_hash, data_fingerprint),
        "assignment": state.assignment,
        "refined": state.refined,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng_state(),
    }


def unpack(payload: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           config_hash: str, data_fingerprint: str, source: str) -> MMDCState:
    """Restore model, optimiser and RNG streams from `payload` (checked first) and return the
    run state it holds."""
    check_compatible(payload, config_hash, data_fingerprint, source)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    restore_rng_state(payload["rng"])
    return restored(payload, MMDCState, assignment=payload["assignment"],
                    refined=payload["refined"])
