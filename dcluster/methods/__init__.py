"""The training methods, each one folder that declares itself (``SPEC``, methods/spec.py),
imported here by name: what `dcluster train`, the Slurm job, `dcluster eval` and `dcluster
export` build or rebuild for a config's ``method``; and the config schema they make together
(core's keys, ``method`` one of theirs, each one's section), from which every config is built.
Adding a method is its folder and one name below."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from dcluster.core import config
from dcluster.methods import deepcluster, deepclusterv2, mmdc
from dcluster.methods.spec import MethodSpec

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (deepcluster.SPEC, mmdc.SPEC,
                                                               deepclusterv2.SPEC)}

Config = config.compose_schema(tuple(METHODS.values()), __name__)


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                check_paths: bool = True) -> config.Config:
    """A config of this schema: core/config.py's ``load_config``."""
    return config.load_config(path, overrides, check_paths, schema=Config)
