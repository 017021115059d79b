"""What the rest of dcluster needs of a training method, declared once in the method's own
folder (``SPEC`` in its ``__init__.py``) and collected by :mod:`dcluster.methods`.

The harness builds ``build(ctx)`` (runtime/context.py's ``Method`` protocol: its network, its
state, its epoch as stages, what its epochs measure); `dcluster eval` and `dcluster export`
rebuild the trained network with ``eval_network(cfg, payload)``, and refuse overrides of the
``network_keys`` (besides model.*) that its weights' shapes depend on. Its config section
``config`` (the keys under its name, None for a method without keys of its own) and its checks
across keys ``validate`` join the schema (core/config.py's ``compose_schema``, called in
:mod:`dcluster.methods`). Nothing below this layer imports a method: the application layer
(cli, train, export, launch) hands the specs and the schema down.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from dcluster.core.config import Config
from dcluster.evaluation.network import Network
from dcluster.runtime.context import Method


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the config's ``method``
    build: type[Method]
    eval_network: Callable[[Config, Optional[dict[str, Any]]], Network]
    network_keys: tuple[str, ...] = ()
    config: Optional[type] = None  # the dataclass of the section ``cfg.<name>``
    validate: Optional[Callable[[Config], None]] = None  # run by core/config.py's validate()
