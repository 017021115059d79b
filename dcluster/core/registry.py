"""The training methods by name (config key ``method``): the one registry that `dcluster train`,
the Slurm job (through dcluster.train) and `dcluster eval` use, so that none of them can run
or rebuild the wrong network.

A method is a module with ``METHOD``, the class the run harness builds (harness.Method),
``eval_network(cfg, payload)``, the network `dcluster eval` loads a checkpoint into, and
``NETWORK_KEYS``, the config keys besides model.* that its network's shapes depend on. Modules
are imported on use: this registry is read by the config schema, which must stay light.
"""
from __future__ import annotations

import importlib
from types import ModuleType

METHODS: dict[str, str] = {
    "deepcluster": "dcluster.methods.deepcluster.method",
    "mmdc": "dcluster.methods.mmdc.method",
}


def method_module(name: str) -> ModuleType:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name])
