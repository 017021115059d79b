"""What an epoch reports: assignment quality against the previous epoch and the true classes,
cluster statistics and where the time went; and the one log line a person reads."""
from __future__ import annotations

from typing import Optional

import numpy as np

from dcluster.metrics import clustering_accuracy, nmi
from dcluster.telemetry import speed_line


def assignment_metrics(labels: np.ndarray, previous: Optional[np.ndarray],
                       targets: Optional[np.ndarray]) -> dict[str, float]:
    """NMI to the previous assignment (stability, paper Fig. 2b) and, when the data has
    classes, NMI and Hungarian accuracy against them. Unreadable images (label -1) are left
    out. The classes are only ever read here, never by training."""
    keep = labels >= 0
    out: dict[str, float] = {}
    if previous is not None:
        both = keep & (previous >= 0)
        out["nmi_prev"] = nmi(labels[both], previous[both])
    if targets is not None:
        out["nmi_classes"] = nmi(labels[keep], targets[keep])
        out["acc_classes"] = clustering_accuracy(labels[keep], targets[keep])
    return out


# which network the epoch's cluster scores measure (a method's ``scored_at``)
SCORED_AT = {
    "start": "start-of-epoch features",  # DeepCluster: the extra pass before the training
    "bank": "training-pass features",  # DeepCluster: the bank of the last epoch's training
    "end": "end-of-epoch features",  # MMDC: the trained embeddings
}


def format_epoch_line(epoch: int, epochs: int, m: dict[str, float], scored_at: str) -> str:
    """The epoch's one INFO line: what each method measured, in a fixed order. The cluster
    scores say which network they measure (``scored_at``, a key of SCORED_AT)."""
    parts = [f"epoch {epoch + 1}/{epochs}", f"loss {m['loss']:.4f}"]
    if "loss_rotation" in m:
        parts.append(f"rotation loss {m['loss_rotation']:.4f}")
    if "moved_fraction" in m:
        parts.append(f"targets moved {100 * m['moved_fraction']:.1f}%")
    if "objective" in m:
        parts.append(f"objective {m['objective']:.4g}")
    scores = [f"{label} {m[key]:.3f}" for key, label in (
        ("nmi_prev", "NMI(prev)"), ("nmi_classes", "NMI(classes)"), ("acc_classes", "ACC(classes)"),
        ("probe_nmi", "kmeans-C NMI"), ("probe_acc", "kmeans-C ACC")) if key in m]
    if scores:
        parts.append(f"{SCORED_AT[scored_at]}: " + " ".join(scores))
    if "monitor_knn_top1" in m:
        parts.append(f"monitor (end of epoch): kNN top1 {m['monitor_knn_top1']:.3f} k-means NMI "
                     f"{m['monitor_kmeans_nmi']:.3f} ACC {m['monitor_kmeans_acc']:.3f}")
    if "n_empty" in m:
        parts.append(f"empty {int(m['n_empty'])} (reseeded {int(m['n_reseeded'])})")
    if "bank_refreshed" in m:
        parts.append(f"bank refreshed {100 * m['bank_refreshed']:.0f}%")
    if "clusters_empty" in m:
        parts.append(f"empty {int(m['clusters_empty'])}")
    parts.append(f"time features {m['time_features']:.1f}s clustering {m['time_clustering']:.1f}s "
                 f"training {m['time_training']:.1f}s"
                 + (f" monitor {m['time_monitor']:.1f}s" if "time_monitor" in m else ""))
    speed = speed_line(m)
    if speed:
        parts.append(speed)
    return " | ".join(parts)
