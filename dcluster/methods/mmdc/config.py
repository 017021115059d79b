"""MMDC's config section (``mmdc.*``) and its checks across keys: composed into the schema
above core (dcluster/methods/__init__.py), so that core names no method."""
from __future__ import annotations

from dataclasses import dataclass

from dcluster.core.config import Config, check_key
from dcluster.core.config_keys import key

_MMDC = ("method", "mmdc")  # MMDC's keys change results only then


@dataclass
class MMDCConfig:
    """Multi-Modal Deep Clustering (Shiran & Weinshall): targets from a mixture of K Gaussians
    on the unit sphere, re-assigned by the Hungarian method within each mini-batch."""
    k: int = key(10, "Mixture components = clusters.", bounds=">= 2", when=_MMDC)
    dim: int = key(0, "Embedding dimension d; 0: d = k (one-hot means need d = k).",
                   bounds=">= 0", when=_MMDC)
    means: str = key("onehot", "onehot (the paper's choice), or uniform (U[-0.1, 0.1]^d, "
                     "projected).", choices=("onehot", "uniform"), when=_MMDC)
    sigma: float = key(0.0, "Per-coordinate standard deviation of each component before the "
                       "projection to the sphere (the paper writes sigma * I; its code draws "
                       "with sigma as the std); 0: targets = means.", bounds=">= 0", when=_MMDC)
    rotation: bool = key(True, "The auxiliary 4-way rotation task after each clustering "
                         "pass.", when=_MMDC)
    refine_epochs: int = key(0, "Epochs after `epochs` with targets from k-means on the "
                             "embeddings (paper III.E).", bounds=">= 0", when=_MMDC)
    lr_decay_epochs: list[int] = key([], "The lr is divided at these epochs.", when=_MMDC)
    lr_decay_factor: float = key(5.0, "What the lr is divided by at each lr_decay_epochs.",
                                 bounds=">= 1", when=_MMDC)


def validate_mmdc(cfg: Config) -> None:
    """The checks across keys under method=mmdc, run by validate() (dcluster/core/config.py)."""
    m = cfg.mmdc
    if m.means == "onehot":
        check_key(m.dim in (0, m.k), "mmdc.dim", m.dim,
               f"one-hot means live in R^k: use 0 or mmdc.k ({m.k}), or mmdc.means=uniform")
    check_key(all(e > 0 for e in m.lr_decay_epochs), "mmdc.lr_decay_epochs", m.lr_decay_epochs,
           "must hold positive epoch numbers")
    # the Hungarian step permutes targets among a batch's images: one image cannot move any
    batch_key = "optim.global_batch" if cfg.optim.global_batch else "optim.batch_size"
    batch = cfg.optim.global_batch or cfg.optim.batch_size
    check_key(batch >= 2, batch_key, batch, "must be at least 2 for method=mmdc")
    check_key(cfg.clustering.features == "extra_pass", "clustering.features",
              cfg.clustering.features, "training_pass is DeepCluster's (method=deepcluster); "
              "MMDC assigns its targets from its own passes")
