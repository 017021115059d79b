"""What every training loop (DeepCluster, MMDC) does first in each process: threads, seeds,
the config hash its checkpoints carry, and the data source with its pipelines."""
from __future__ import annotations

import torch

from dcluster.config import Config, config_hash
from dcluster.data import Pipelines, build_pipelines, open_source
from dcluster.seeding import seed_everything


def set_up_process(cfg: Config):
    """Returns (config hash, image source, pipelines)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    source = open_source(cfg.data)
    pipelines: Pipelines = build_pipelines(source, cfg.data, cfg.seed)
    return config_hash(cfg), source, pipelines
