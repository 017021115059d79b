"""Which training loop a config asks for (`method: deepcluster | mmdc`); the CLI and the Slurm
job both start runs through here so that neither can run the wrong method."""
from __future__ import annotations

from dcluster.config import Config
from dcluster.train import RunResult


def run_method(cfg: Config) -> RunResult:
    if cfg.method == "mmdc":
        from dcluster.mmdc.train import train_mmdc

        return train_mmdc(cfg)
    from dcluster.train import train

    return train(cfg)
