"""Seeds derived from (run seed, epoch, purpose), so that each random choice of an epoch is
reproducible on its own — after a resume, or on every rank — without replaying the others."""
from __future__ import annotations

import random

import numpy as np
import torch

PURPOSES = {"kmeans": 1, "head": 2, "probe": 3, "targets": 4, "target_noise": 5, "order": 6,
            "rotation_order": 7, "refine": 8, "eval_split": 9, "eval_kmeans": 10,
            "linear_order": 11, "dropout": 13, "monitor_sample": 14}


def derived_seed(seed: int, epoch: int, purpose: str, *streams: int) -> int:
    """A 31-bit seed (FAISS takes an int) mixed from the parts by SeedSequence; ``streams``
    (a rank, say) tell apart several streams of one purpose in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, PURPOSES[purpose], *streams])
               .generate_state(1)[0] & 0x7FFFFFFF)


def derived_rng(seed: int, epoch: int, purpose: str) -> np.random.Generator:
    """A NumPy generator for (seed, epoch, purpose); ``epoch`` may be any non-negative key
    (an image index, say) that tells one stream of a purpose from another."""
    return np.random.default_rng([seed, epoch, PURPOSES[purpose]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
