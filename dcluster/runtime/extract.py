"""The feature pass: clustering features (or another per-image output) of this process's
shard of images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from dcluster.data import Pipelines, num_batches
from dcluster.parallel.execution import Execution
from dcluster.core.logs import progress
from dcluster.parallel.memory_plan import plan


@dataclass
class ShardFeatures:
    # (n, D), row i belongs to global image indices[i]: a float32 host array, or with
    # keep_on_device a float32 tensor on the device that computed it (the clustering stage's
    # PCA runs there); from a feature bank, a tensor in the bank's dtype
    features: Union[np.ndarray, torch.Tensor]
    indices: np.ndarray  # int64 (n,), in the order the shard was given, unreadable ones absent

    def host_features(self) -> np.ndarray:
        """The features as a float32 host array (a copy only if they are on a GPU or stored
        in another dtype, as a feature bank may store them)."""
        f = self.features
        return f.float().cpu().numpy() if isinstance(f, torch.Tensor) else f


def extract_features(model: nn.Module, pipelines: Pipelines, indices: Sequence[int],
                     batch_size: int, device: torch.device, progress_mode: str, show: bool,
                     compute: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                     stop: Callable[[], bool] = lambda: False,
                     keep_on_device: bool = False,
                     execution: Optional[Execution] = None) -> ShardFeatures:
    """Run the centre-crop pipeline over `indices` in eval mode (BatchNorm running statistics,
    no dropout), so an image's feature does not depend on which batch it landed in.

    `compute` maps a batch of images to (B, D) rows; the default is the model's clustering
    features. Evaluation passes other outputs of the same network (MMDC's embedding, say).
    The pass ends early, with the rows it has, once `stop()` is true: a job asked to stop
    does not spend its last minutes on features it will compute again after the resume.

    ``keep_on_device``: the rows stay on ``device`` when the memory plan finds room for them
    there (dcluster/parallel/memory_plan.py: a GPU holds 160k x 4096 float32 rows, ImageNet's per-GPU
    share on 8 GPUs, in 2.6 GB; not the 21 GB of all 1.28M), else they are written to host
    memory batch by batch, as they always are without it. ``execution``: the autocast
    precision and memory format (default float32, contiguous); rows are written as float32
    whatever the precision, into one matrix allocated at the first batch (no low-precision
    copy next to a float32 one)."""
    compute = compute or model.clustering_features
    execution = execution or Execution(device)
    was_training = model.training
    model.eval()
    rows: Optional[torch.Tensor] = None  # on the device, allocated at the first batch
    got = np.empty(len(indices), dtype=np.int64)
    filled = 0
    batches = pipelines.feature_batches(indices, batch_size)
    # no_grad rather than inference_mode: the clustering stage works on the rows in place
    with torch.no_grad(), execution.autocast():
        for batch in progress(batches, num_batches(len(indices), batch_size), "features",
                              progress_mode, show):
            if stop():
                break
            out = compute(execution.images(batch.images))
            if rows is None:
                storage = (plan("feature pass rows", len(indices), out.shape[1], 4, device).device
                           if keep_on_device else torch.device("cpu"))
                rows = torch.empty((len(indices), out.shape[1]), dtype=torch.float32,
                                   device=storage)
            n = out.shape[0]
            rows[filled:filled + n] = out
            got[filled:filled + n] = batch.indices.numpy()
            filled += n
    model.train(was_training)
    if rows is None:
        rows = torch.empty((0, 0), device=device if keep_on_device else "cpu")
    kept = rows[:filled]
    return ShardFeatures(features=kept if kept.is_cuda else kept.numpy(), indices=got[:filled])
