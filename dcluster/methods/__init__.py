"""The training methods, each one folder that declares itself (``SPEC``, methods/spec.py),
imported here by name: what `dcluster train`, the Slurm job, `dcluster eval` and `dcluster
export` build or rebuild for a config's ``method``."""
from __future__ import annotations

from dcluster.methods import deepcluster, deepclusterv2, mmdc
from dcluster.methods.spec import MethodSpec

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (deepcluster.SPEC, mmdc.SPEC,
                                                               deepclusterv2.SPEC)}

