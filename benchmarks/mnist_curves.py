"""The MNIST runs' per-epoch curves from their own histories, as one PNG for docs/results.md.

Each run directory's newest checkpoint holds the run's history (one entry per finished
epoch: what the epoch line printed). This draws, per run, NMI and ACC against the classes
(MMDC: its own clusters; DeepCluster: the NMI of its k clusters, without an ACC when k is not
the number of classes, and the k = #classes probe where the config has one) over the epochs, beside the MMDC paper's rows (Table I, and Table V before
refinement) as horizontal lines. Reads checkpoints only: it runs beside a training job.

    python benchmarks/mnist_curves.py RUN_DIR [RUN_DIR ...] --out docs/img/mnist_curves.png

Prints one line per run (epochs so far, the last epoch's numbers); the last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dcluster.runtime.checkpoint import load_latest

PAPER_ROWS = {  # MMDC paper (shared/papers/mmdc_multimodal_deep_clustering.txt), NMI / ACC
    "MMDC (Table I)": (0.971, 0.990),
    "MMDC before refinement (Table V)": (0.950, 0.981),
    "DEC (Table I)": (0.772, 0.843),
}
SERIES = (("nmi_classes", "NMI"), ("acc_classes", "ACC"), ("probe_nmi", "probe NMI (k = 10)"))
CLASSES = 10


def run_history(run_dir: Path) -> list[dict]:
    """The history in the newest readable checkpoint of ``run_dir``."""
    latest = load_latest(run_dir / "checkpoints")
    if latest is None:
        print(f"{run_dir}: no checkpoint to read a history from", file=sys.stderr)
        raise SystemExit(2)
    return list(latest[0]["history"])


def series_of(history: list[dict]) -> list[tuple[str, str]]:
    """The curves worth drawing for one run. A run that over-clusters (DeepCluster, k = 50)
    gets its NMI labelled with its k and no ACC: one-to-one matching of 50 clusters to 10
    classes leaves 40 clusters unmatched, so that ACC says nothing about the features."""
    k = history[-1].get("n_clusters") if history else None
    if k is None or k == CLASSES:
        return list(SERIES)
    return [(key, f"NMI of its k = {k} clusters" if key == "nmi_classes" else label)
            for key, label in SERIES if key != "acc_classes"]


def draw(histories: dict[str, list[dict]], out: Path) -> None:
    fig = Figure(figsize=(8, 5), constrained_layout=True)
    ax = fig.subplots()
    for run, history in histories.items():
        for key, label in series_of(history):
            points = [(e["epoch"], e[key]) for e in history if e.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=f"{run}: {label}")
    for (name, (nmi, _)), style in zip(PAPER_ROWS.items(), (":", "--", "-.")):
        ax.axhline(nmi, color="grey", linestyle=style, linewidth=1, label=f"paper NMI, {name}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("against the 10 classes, all 70,000 digits")
    ax.set_ylim(0.3, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/img/mnist_curves.png"))
    args = parser.parse_args()
    histories = {run.name: run_history(run) for run in args.runs}
    summary = {}
    for run, history in histories.items():
        last = history[-1] if history else {}
        summary[run] = {"epochs": len(history),
                        **{key: last.get(key) for key, _ in series_of(history)
                           if last.get(key) is not None}}
        print(f"{run}: {summary[run]}")
    draw(histories, args.out)
    print(json.dumps({"out": str(args.out), "runs": summary}, default=float))


if __name__ == "__main__":
    main()
