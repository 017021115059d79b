"""The names of the training methods: the choices of the config key ``method``, read by the
schema, which must stay light. Each method is a folder under dcluster/methods/ that declares
itself (its ``SPEC``); dcluster/methods/__init__.py collects them and checks that they are
these."""
from __future__ import annotations

METHOD_NAMES: tuple[str, ...] = ("deepcluster", "mmdc", "deepclusterv2")
