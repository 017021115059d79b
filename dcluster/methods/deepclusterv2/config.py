"""DeepCluster-v2's config section (``deepclusterv2.*``) and its checks across keys: composed
into the schema above core (dcluster/methods/__init__.py), so that core names no method."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dcluster.core.config import Config, check_key
from dcluster.core.config_keys import key

# its keys change results only under method=deepclusterv2, and came with it (e8dd5d4): the
# method did not exist before, so their legacy values are their defaults
_V2_KEY: dict[str, Any] = {"when": ("method", "deepclusterv2"), "since": "e8dd5d4"}


@dataclass
class DeepClusterV2Config:
    """DeepCluster-v2 (SwAV paper, appendix; dcluster/methods/deepclusterv2/): spherical
    k-means of a memory bank of embeddings into frozen prototypes, predicted from every view
    of an image. Defaults: swav's DeepCluster-v2 scripts (scripts/deepclusterv2_800ep_
    pretrain.sh; its base lr 4.8 and weight decay 1e-6 are optim.lr and optim.weight_decay)."""
    feat_dim: int = key(128, "Dimension of the L2-normalised embedding (the projection "
                        "head's output).", bounds="> 0", **_V2_KEY, legacy=128)
    hidden_mlp: int = key(2048, "Hidden width of the projection head (Linear-BN-ReLU-"
                          "Linear); 0: one Linear projection.", bounds=">= 0", **_V2_KEY,
                          legacy=2048)
    prototypes: list[int] = key([3000, 3000, 3000], "Clusters of each clustering head: one "
                                "k-means and one frozen prototype layer per entry.",
                                **_V2_KEY, legacy=[3000, 3000, 3000])
    temperature: float = key(0.1, "Prototype scores (cosines) are divided by it before the "
                             "cross-entropy.", bounds="> 0", **_V2_KEY, legacy=0.1)
    kmeans_iters: int = key(10, "Iterations of each epoch's spherical k-means.",
                            bounds=">= 1", **_V2_KEY, legacy=10)
    crops_for_assign: list[int] = key([0, 1], "The views (positions among data.crops') whose "
                                      "embeddings fill the memory banks, one bank each; head "
                                      "h clusters bank h % len.", **_V2_KEY, legacy=[0, 1])
    warmup_epochs: int = key(10, "Epochs of linear lr warm-up from start_warmup to optim.lr.",
                             bounds=">= 0", **_V2_KEY, legacy=10)
    start_warmup: float = key(0.3, "The lr at the first step of the warm-up.", bounds=">= 0",
                              **_V2_KEY, legacy=0.3)
    final_lr: float = key(0.0048, "The lr the cosine decay ends at, at the last step.",
                          bounds=">= 0", **_V2_KEY, legacy=0.0048)
    lars_eta: float = key(0.001, "LARS trust coefficient: a weight's lr is scaled by "
                          "eta * ||w|| / (||g|| + weight_decay * ||w||).", bounds="> 0",
                          **_V2_KEY, legacy=0.001)


def validate_deepclusterv2(cfg: Config) -> None:
    """The list-valued keys a bound cannot express, and the views they name."""
    v2 = cfg.deepclusterv2
    check_key(len(v2.prototypes) > 0 and all(k >= 2 for k in v2.prototypes),
              "deepclusterv2.prototypes", v2.prototypes,
              "must hold at least one head, each of at least 2 clusters")
    views = sum(group["count"] for group in cfg.data.crops) if cfg.data.crops else 1
    check_key(len(v2.crops_for_assign) > 0 and len(set(v2.crops_for_assign)) ==
              len(v2.crops_for_assign) and all(0 <= v < views for v in v2.crops_for_assign),
              "deepclusterv2.crops_for_assign", v2.crops_for_assign,
              f"must name at least one view, each once, by its position among the {views} "
              "view(s) data.crops declares (0 = the first)")
    check_key(cfg.clustering.features == "extra_pass", "clustering.features",
              cfg.clustering.features, "training_pass is DeepCluster's (method=deepcluster); "
              "DeepCluster-v2 always clusters its training pass's memory bank")
