"""What an epoch reports: assignment quality against the previous epoch and the true classes,
cluster statistics and where the time went; and the one log line a person reads."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from dcluster.core.metric_spec import Metric
from dcluster.core.metrics import clustering_accuracy, nmi
from dcluster.reporting.telemetry import speed_line


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


# the harness's own scores of the epoch's clusters, then each method's (place "scores")
ASSIGNMENT_SCORES = (Metric("nmi_prev", "NMI(prev) {nmi_prev:.3f}", "scores"),
                     Metric("nmi_classes", "NMI(classes) {nmi_classes:.3f}", "scores"),
                     Metric("acc_classes", "ACC(classes) {acc_classes:.3f}", "scores"))


def format_epoch_line(epoch: int, epochs: int, m: dict[str, float], declared: Sequence[Metric],
                      scored_at: str) -> str:
    """The epoch's one INFO line: the loss, the method's ``declared`` values in their places,
    the cluster scores prefixed with the network they measure (``scored_at``, say
    "end-of-epoch features"), the monitor, the times and the speed."""
    def placed(place: str, among: Sequence[Metric] = declared) -> list[str]:
        return [text for metric in among if metric.place == place
                for text in [metric.text(m)] if text is not None]

    parts = [f"epoch {epoch + 1}/{epochs}", f"loss {m['loss']:.4f}", *placed("after_loss")]
    scores = placed("scores", (*ASSIGNMENT_SCORES, *declared))
    if scores:
        parts.append(f"{scored_at}: " + " ".join(scores))
    if "monitor_knn_top1" in m:
        parts.append(f"monitor (end of epoch): kNN top1 {m['monitor_knn_top1']:.3f} k-means NMI "
                     f"{m['monitor_kmeans_nmi']:.3f} ACC {m['monitor_kmeans_acc']:.3f}")
    parts.extend(placed("after_monitor"))
    parts.append(f"time features {m.get('time_features', 0.0):.1f}s clustering "
                 f"{m.get('time_clustering', 0.0):.1f}s training {m.get('time_training', 0.0):.1f}s"
                 + (f" monitor {m['time_monitor']:.1f}s" if "time_monitor" in m else ""))
    speed = speed_line(m)
    if speed:
        parts.append(speed)
    return " | ".join(parts)
