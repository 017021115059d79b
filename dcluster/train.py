"""`dcluster train`: one run of the config's method, in this process's place in the job.

Environment (rank, world size, device) -> process group -> stop-signal handlers -> the run
harness (dcluster/harness.py) with the config's method (its folder's SPEC, collected by
dcluster/methods/__init__.py). The epochs themselves read top to bottom in the method's
module: dcluster/methods/deepcluster/method.py, dcluster/methods/mmdc/method.py.
"""
from __future__ import annotations

import logging

from dcluster.clustering.kmeans import machine_backend_rows
from dcluster.parallel.collectives import Comm
from dcluster.core.config import Config
from dcluster.parallel.distributed import detect_env, process_group
from dcluster.parallel.hardware import require_fitting_build
from dcluster.harness import RunResult, run_method
from dcluster.methods import METHODS
from dcluster.runtime.stop import StopRequest

log = logging.getLogger(__name__)


def train(cfg: Config) -> RunResult:
    require_fitting_build(cfg)  # exit 2 before the job starts, not an epoch into it
    for what, how in machine_backend_rows(cfg.clustering.backend, cfg.clustering.device):
        log.info("%s: %s", what, how)
    env = detect_env()
    method = METHODS[cfg.method].build
    with process_group(env, cfg.distributed), StopRequest() as stop_request:
        return run_method(cfg, env, Comm(env, timeout_s=cfg.distributed.timeout_s), stop_request, method)
