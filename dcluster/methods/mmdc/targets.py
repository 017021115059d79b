"""MMDC's target points (paper section III.B, eq. 2 and Algorithm 1's initialisation).

One target per image, drawn once: a component c ~ Categorical(1/K), then u ~ N(mu_c, sigma^2 I)
in R^d, projected to the unit sphere. Only the components are held in memory; a point is
recomputed from its own generator, keyed by (seed, target id), whenever a batch needs it. That
keeps the bank at 8 bytes a target (ImageNet with d = K = 1000 would otherwise hold 5 GB of
floats) and makes it identical on every rank and after every resume without being stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from dcluster.methods.mmdc.config import MMDCConfig
from dcluster.core.seeding import derived_rng

UNIFORM_RANGE = 0.1  # the paper's alternative means: U[-0.1, 0.1]^d, then projected


def embedding_dim(cfg: MMDCConfig) -> int:
    return cfg.dim or cfg.k


def mixture_means(cfg: MMDCConfig, seed: int) -> np.ndarray:
    """float32 (K, d) unit rows: K one-hot vectors (the paper's choice, d = K) or uniform
    draws in [-0.1, 0.1]^d projected to the sphere."""
    if cfg.means == "onehot":
        return np.eye(cfg.k, dtype=np.float32)
    if cfg.means == "uniform":
        rng = derived_rng(seed, 0, "targets")
        means = rng.uniform(-UNIFORM_RANGE, UNIFORM_RANGE, (cfg.k, embedding_dim(cfg)))
        return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
    raise ValueError(f"mmdc.means = {cfg.means!r}: expected onehot or uniform")


def nearest_component(embeddings: np.ndarray, means: np.ndarray) -> np.ndarray:
    """int64 cluster of each row (paper eq. 3): the mean at the smallest Euclidean distance."""
    x = np.asarray(embeddings, dtype=np.float32)
    distances = (x * x).sum(1, keepdims=True) - 2.0 * x @ means.T + (means * means).sum(1)
    return distances.argmin(axis=1).astype(np.int64)


class TargetBank:
    """The n target points of a run, addressed by target id 0..n-1."""

    def __init__(self, n: int, cfg: MMDCConfig, seed: int) -> None:
        self.seed = seed
        self.sigma = cfg.sigma
        self.means = mixture_means(cfg, seed)
        self.components = derived_rng(seed, 1, "targets").integers(0, cfg.k, n).astype(np.int64)

    def __len__(self) -> int:
        return len(self.components)

    def points(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), d): the unit-norm target points with these ids."""
        ids = np.asarray(ids, dtype=np.int64)
        centres = self.means[self.components[ids]]
        if self.sigma == 0.0:
            return centres.copy()
        d = self.means.shape[1]
        noise = np.stack([derived_rng(self.seed, int(i), "target_noise").standard_normal(d)
                          for i in ids]) if len(ids) else np.empty((0, d))
        u = centres + self.sigma * noise
        return (u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)


@dataclass
class Targets:
    """What training changes of the targets, and so what the checkpoint holds of them: the
    points themselves are a function of (seed, mmdc.*, number of images) (TargetBank)."""
    assignment: np.ndarray  # int64 (N,): target id of each image, a permutation of 0..N-1
    refined: Optional[np.ndarray] = None  # int64 (N,): component pulled to, refinement stage

    def state_dict(self) -> dict[str, Any]:
        return {"assignment": self.assignment, "refined": self.refined}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.assignment, self.refined = state["assignment"], state["refined"]
