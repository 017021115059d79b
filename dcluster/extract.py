"""The feature pass: clustering features (or another per-image output) of this process's
shard of images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dcluster.data import Pipelines, num_batches
from dcluster.execution import Execution
from dcluster.logs import progress


@dataclass
class ShardFeatures:
    features: np.ndarray  # float32 (n, D), row i belongs to global image indices[i]
    indices: np.ndarray  # int64 (n,), in the order the shard was given, unreadable ones absent


def extract_features(model: nn.Module, pipelines: Pipelines, indices: Sequence[int],
                     batch_size: int, device: torch.device, progress_mode: str, show: bool,
                     compute: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                     stop: Callable[[], bool] = lambda: False,
                     execution: Optional[Execution] = None) -> ShardFeatures:
    """Run the centre-crop pipeline over `indices` in eval mode (BatchNorm running statistics,
    no dropout), so an image's feature does not depend on which batch it landed in.

    `compute` maps a batch of images to (B, D) rows; the default is the model's clustering
    features. Evaluation passes other outputs of the same network (MMDC's embedding, say).
    The pass ends early, with the rows it has, once `stop()` is true: a job asked to stop
    does not spend its last minutes on features it will compute again after the resume.

    ``execution``: the autocast precision and memory format (default float32, contiguous);
    rows come back as float32 whatever the precision. The batches' outputs stay on the
    device until the pass ends, so that no batch waits for the copy of the one before."""
    compute = compute or model.clustering_features
    execution = execution or Execution(device)
    was_training = model.training
    model.eval()
    rows: Optional[torch.Tensor] = None  # on the device, allocated at the first batch
    got = np.empty(len(indices), dtype=np.int64)
    filled = 0
    batches = pipelines.feature_batches(indices, batch_size)
    with torch.inference_mode(), execution.autocast():
        for batch in progress(batches, num_batches(len(indices), batch_size), "features",
                              progress_mode, show):
            if stop():
                break
            out = compute(execution.images(batch.images))
            if rows is None:
                rows = out.new_empty((len(indices), out.shape[1]))
            n = out.shape[0]
            rows[filled:filled + n] = out
            got[filled:filled + n] = batch.indices.numpy()
            filled += n
    model.train(was_training)
    features = (rows[:filled].float().cpu().numpy() if rows is not None
                else np.empty((0, 0), dtype=np.float32))
    return ShardFeatures(features=features, indices=got[:filled])
