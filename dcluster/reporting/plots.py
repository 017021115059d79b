"""The two pictures that tell whether DeepCluster is learning: how stable the clusters are from
epoch to epoch (NMI with the previous assignment, Fig. 2b of the paper) and how balanced they
are (a few giant clusters mean a collapsing representation).

Figures are drawn on matplotlib's Agg canvas directly, without pyplot: no display is needed on
a compute node, and no global figure registry grows over a long run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

# Keys of a history entry (one dict per epoch); a missing or None value leaves a gap, since
# NMI with the previous epoch does not exist at the first epoch, nor NMI with the classes of
# an unlabelled data set.
EPOCH, NMI_PREV, NMI_CLASSES, LOSS = "epoch", "nmi_prev", "nmi_classes", "loss"
PROBE_NMI = "probe_nmi"  # k-means with k = #classes on the features (eval.class_kmeans)


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(entry[EPOCH], entry[key]) for entry in history if entry.get(key) is not None]
    return [epoch for epoch, _ in points], [float(value) for _, value in points]


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def plot_nmi_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """NMI vs the previous epoch and vs the true classes (top), training loss (bottom)."""
    fig = Figure(figsize=(7, 6), constrained_layout=True)
    nmi_ax, loss_ax = fig.subplots(2, 1, sharex=True)
    for key, label in ((NMI_PREV, "NMI(t-1, t)"), (NMI_CLASSES, "NMI(classes, t)"),
                       (PROBE_NMI, "NMI(classes, k-means k=#classes on features)")):
        epochs, values = _series(history, key)
        if epochs:
            nmi_ax.plot(epochs, values, marker=".", label=label)
    nmi_ax.set_ylabel("NMI")
    nmi_ax.set_ylim(0.0, 1.0)
    nmi_ax.grid(alpha=0.3)
    if nmi_ax.lines:
        nmi_ax.legend(loc="lower right")
    epochs, values = _series(history, LOSS)
    loss_ax.plot(epochs, values, marker=".", color="tab:red")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_monitor_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """The online monitor's measures by epoch (dcluster/evaluation/monitor.py): whether the features
    still improve, and where the best epoch is."""
    fig = Figure(figsize=(7, 4), constrained_layout=True)
    ax = fig.subplots()
    for key, label in (("monitor_knn_top1", "weighted k-NN top-1 (held-out)"),
                       ("monitor_kmeans_nmi", "k-means k=#classes NMI"),
                       ("monitor_kmeans_acc", "k-means k=#classes ACC")):
        epochs, values = _series(history, key)
        if epochs:
            ax.plot(epochs, values, marker=".", label=label)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower right")
    return _save(fig, path)


def _plain_log_y_ticks(ax: Axes) -> None:
    """Label the log y axis with plain numbers, 1 2 5 10 20 50 ... over a few decades and
    1 10 100 ... over more, instead of matplotlib's 10^k math text: counts read at a glance."""
    low, high = ax.get_ylim()
    subs = (1.0, 2.0, 5.0) if np.log10(high / low) <= 3 else (1.0,)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())  # minor ticks stay, unlabelled


def plot_cluster_sizes(sizes: np.ndarray, path: Path, epoch: int | None = None) -> Path:
    """Histogram of the number of images per cluster; log-y so that a few huge clusters and
    many tiny ones are both visible."""
    sizes = np.asarray(sizes)
    fig = Figure(figsize=(7, 4), constrained_layout=True)
    ax = fig.subplots()
    ax.hist(sizes, bins=min(50, max(1, len(np.unique(sizes)))), log=True, color="tab:blue")
    _plain_log_y_ticks(ax)
    ax.set_xlabel("images per cluster")
    ax.set_ylabel("clusters")
    title = f"k={sizes.size}, empty={int((sizes == 0).sum())}, largest={int(sizes.max(initial=0))}"
    ax.set_title(title if epoch is None else f"epoch {epoch}: {title}")
    return _save(fig, path)


def plot_throughput(history: list[dict[str, Any]], path: Path) -> Path:
    """Images per second of the feature and training passes over all ranks (top), and the
    share of the training pass spent waiting for data (bottom): a loader that cannot keep
    up shows as a rising bottom curve and a flat top one."""
    fig = Figure(figsize=(7, 5), constrained_layout=True)
    rate_ax, wait_ax = fig.subplots(2, 1, sharex=True)
    for key, label in (("speed_train_img_s", "training pass"),
                       ("speed_features_img_s", "feature pass")):
        epochs, values = _series(history, key)
        if epochs:
            rate_ax.plot(epochs, values, marker=".", label=label)
    rate_ax.set_ylabel("images / s (all ranks)")
    rate_ax.set_ylim(bottom=0.0)
    rate_ax.grid(alpha=0.3)
    if rate_ax.lines:
        rate_ax.legend(loc="lower right")
    epochs, values = _series(history, "speed_data_wait")
    wait_ax.plot(epochs, [100 * v for v in values], marker=".", color="tab:gray")
    wait_ax.set_ylabel("waiting for data (%)")
    wait_ax.set_ylim(0.0, 100.0)
    wait_ax.set_xlabel("epoch")
    wait_ax.grid(alpha=0.3)
    return _save(fig, path)
