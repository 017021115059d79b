"""Throughput telemetry of an epoch: how fast the feature and training passes went over all
ranks, how much of the training pass waited for data, and the memory peaks.

The passes leave raw counts in the epoch's metrics (``images_features``, ``images_trained``:
this rank's images; ``time_data_wait``: this rank's seconds waiting for batches); at the
report they become the ``speed_*`` metrics of the whole job. Every rank calls
:func:`speed_metrics` (it reduces across ranks); the values are measurements, not results, so
they are kept apart from what a resumed run must reproduce (their prefix, SPEED).
"""
from __future__ import annotations

import resource
import sys
from typing import Optional

import numpy as np
import torch

from dcluster.parallel.collectives import Comm
from dcluster.parallel.execution import peak_gpu_memory_gb

SPEED = "speed_"  # the prefix of every telemetry metric
COUNTS = ("images_features", "images_trained")


def host_peak_memory_gb() -> float:
    """This process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def speed_metrics(metrics: dict[str, float], comm: Comm,
                  device: torch.device) -> dict[str, float]:
    """The job's telemetry for the epoch; takes the raw counts out of ``metrics``.

    speed_features_img_s / speed_train_img_s: images of all ranks per second of the pass
    (rank 0's wall time); speed_data_wait: the largest share of a rank's training time spent
    waiting for its batches; speed_gpu_mem_gb (and ..._rank<R>): peak GPU memory allocated,
    the largest over ranks; speed_host_mem_gb: rank 0's peak resident memory."""
    counts = [float(metrics.pop(key, 0.0)) for key in COUNTS]
    training = metrics.get("time_training", 0.0)
    wait_share = metrics.get("time_data_wait", 0.0) / training if training > 0 else 0.0
    images = comm.all_reduce_sum(np.array(counts, dtype=np.float64))
    wait_share = float(comm.all_reduce_max(np.array([wait_share]))[0])
    out: dict[str, float] = {}
    for images_done, key, time_key in zip(images, ("speed_features_img_s", "speed_train_img_s"),
                                          ("time_features", "time_training")):
        seconds = metrics.get(time_key, 0.0)
        if images_done > 0 and seconds > 0:
            out[key] = float(images_done / seconds)
    if "speed_train_img_s" in out:
        out["speed_data_wait"] = wait_share
    gpu: list[Optional[float]] = comm.all_gather_object(peak_gpu_memory_gb(device))
    if all(peak is not None for peak in gpu):
        out["speed_gpu_mem_gb"] = float(max(gpu))  # type: ignore[type-var]
        out.update({f"speed_gpu_mem_gb_rank{rank}": float(peak)  # type: ignore[arg-type]
                    for rank, peak in enumerate(gpu)})
    out["speed_host_mem_gb"] = host_peak_memory_gb()
    return out


def speed_line(m: dict[str, float]) -> str:
    """The epoch line's short telemetry part ('' when nothing was measured)."""
    parts = []
    if "speed_features_img_s" in m:
        parts.append(f"features {m['speed_features_img_s']:.0f} img/s")
    if "speed_train_img_s" in m:
        parts.append(f"training {m['speed_train_img_s']:.0f} img/s "
                     f"(data wait {100 * m['speed_data_wait']:.0f}%)")
    if "speed_gpu_mem_gb" in m:
        parts.append(f"GPU peak {m['speed_gpu_mem_gb']:.1f} GB")
    if "speed_host_mem_gb" in m:
        parts.append(f"host peak {m['speed_host_mem_gb']:.1f} GB")
    return ", ".join(parts)
