"""DeepCluster-v2's settings, declared as dcluster declares every config key (``key()``:
meaning, bounds, hashed), with the values of swav's DeepCluster-v2 scripts as defaults
(scripts/deepclusterv2_800ep_pretrain.sh; its base lr 4.8 and weight decay 1e-6 are
``optim.lr`` and ``optim.weight_decay``).

The section is validated on its own (:func:`check`): the bounds declared beside each field,
then the list-valued keys a bound cannot express, every error naming
``deepclusterv2.<key>`` as a run's config error does, so that a bad value is refused at
start-up rather than at the first clustering, an epoch into the run.
"""
from __future__ import annotations

from dataclasses import dataclass

from dcluster.core.config import check_key
from dcluster.core.config_keys import declarations, key

SECTION = "deepclusterv2"
_V2 = ("method", SECTION)  # its keys change results only then


@dataclass
class DeepClusterV2Config:
    """DeepCluster-v2 (SwAV paper, appendix): spherical k-means of a memory bank of
    embeddings into frozen prototypes, predicted from every view of an image."""
    feat_dim: int = key(128, "Dimension of the L2-normalised embedding (the projection "
                        "head's output).", bounds="> 0", when=_V2)
    hidden_mlp: int = key(2048, "Hidden width of the projection head (Linear-BN-ReLU-"
                          "Linear); 0: one Linear projection.", bounds=">= 0", when=_V2)
    prototypes: list[int] = key([3000, 3000, 3000], "Clusters of each clustering head: one "
                                "k-means and one frozen prototype layer per entry.", when=_V2)
    temperature: float = key(0.1, "Prototype scores (cosines) are divided by it before the "
                             "cross-entropy.", bounds="> 0", when=_V2)
    kmeans_iters: int = key(10, "Iterations of each epoch's spherical k-means.",
                            bounds=">= 1", when=_V2)
    crops_for_assign: list[int] = key([0, 1], "The views whose embeddings fill the memory "
                                      "bank; the heads take them in turn (head h clusters "
                                      "view crops_for_assign[h % len]).", when=_V2)
    warmup_epochs: int = key(10, "Epochs of linear lr warm-up from start_warmup to optim.lr.",
                             bounds=">= 0", when=_V2)
    start_warmup: float = key(0.3, "The lr at the first step of the warm-up.", bounds=">= 0",
                              when=_V2)
    final_lr: float = key(0.0048, "The lr the cosine decay ends at, at the last step.",
                          bounds=">= 0", when=_V2)
    lars_eta: float = key(0.001, "LARS trust coefficient: a weight's lr is scaled by "
                          "eta * ||w|| / (||g|| + weight_decay * ||w||).", bounds="> 0",
                          when=_V2)


def check(cfg: DeepClusterV2Config) -> None:
    """Raise a ConfigError naming ``deepclusterv2.<key>`` for the first bad value."""
    declared = declarations(DeepClusterV2Config)
    for name, entry in declared.items():
        value = getattr(cfg, name)
        problem = entry.key.problem(value)
        check_key(problem is None, f"{SECTION}.{name}", value, problem or "")
    check_key(len(cfg.prototypes) > 0 and all(k >= 2 for k in cfg.prototypes),
              f"{SECTION}.prototypes", cfg.prototypes,
              "must hold at least one head, each of at least 2 clusters")
    check_key(len(cfg.crops_for_assign) > 0 and all(v >= 0 for v in cfg.crops_for_assign)
              and len(set(cfg.crops_for_assign)) == len(cfg.crops_for_assign),
              f"{SECTION}.crops_for_assign", cfg.crops_for_assign,
              "must name at least one view, each once, by its position (0 = the first)")
