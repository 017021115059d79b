"""The settings a run's results depend on (its hashed keys), as a checkpoint records them and
as a resume compares them, across releases of dcluster.

A checkpoint holds the flat mapping of the hashed keys (``settings``). A resume reads it key by
key: a key the checkpoint lacks (added by a later release) takes its declared legacy value,
the one that reproduces the behaviour before the key existed, and only a real change of a
hashed setting is refused, naming it. Checkpoints of the releases before this one
(``HASH_ONLY_RELEASES``) record only a hash of their hashed keys; their settings are found by
hashing today's values of the keys each of those releases knew (:func:`settings_behind_hash`).
Each function reads the declarations of ``schema``, the composed one (core/config.py's
``compose_schema``), or of the config it is given.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Optional

from dcluster.core.config import Config, ConfigError, flatten, keys_in_yaml_file
from dcluster.core.config_keys import NO_LEGACY, SameAs, declarations, hashed_names

# The commits that added keys while checkpoints recorded only ``config_hash`` (3645733 to
# 0dd45d7); frozen: from this release on, checkpoints record their settings.
HASH_ONLY_RELEASES = ("482ef12", "9c7b1a2", "629576f", "231d085", "e601b38", "ad76a52",
                      "b62a755")


def hashed_settings(cfg: Config) -> dict[str, Any]:
    """The keys that change what the run computes, with their values."""
    flat = flatten(cfg)
    return {name: flat[name] for name in hashed_names(type(cfg))}


def settings_hash(settings: dict[str, Any]) -> str:
    """What every release has called the config hash (an MLflow tag, old checkpoints)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg: Config) -> str:
    return settings_hash(hashed_settings(cfg))


def with_legacy(recorded: dict[str, Any], schema: type) -> dict[str, Any]:
    """``recorded`` (a checkpoint's or an old config.yaml's settings) completed with the
    legacy values of the hashed keys it lacks, which were added after it was written."""
    known = declarations(schema)
    out = {name: recorded[name] for name in hashed_names(schema) if name in recorded}
    for name in hashed_names(schema):
        if name in out:
            continue
        legacy = known[name].key.legacy
        if legacy is NO_LEGACY:  # a key of the first release: every record has it
            raise ConfigError(f"config key '{name}' is missing from the recorded settings (a "
                              "config.yaml or checkpoint not written by dcluster?), and it "
                              "existed in every release")
        out[name] = out[legacy.key] if isinstance(legacy, SameAs) else legacy
    return out


def _in_effect(name: str, settings: dict[str, Any], schema: type) -> bool:
    when = declarations(schema)[name].key.when
    return when is None or settings[when[0]] == when[1]


def setting_changes(recorded: dict[str, Any], now: dict[str, Any],
                    schema: type) -> list[tuple[str, Any, Any]]:
    """The hashed keys whose value changed from ``recorded`` (legacy values filling in what it
    lacks) to ``now``, as (key, old, new); a key that changes results only under another
    key's value (its ``when``) counts only where it is in effect."""
    old = with_legacy(recorded, schema)
    return [(name, old[name], now[name]) for name in now if old[name] != now[name]
            and (_in_effect(name, old, schema) or _in_effect(name, now, schema))]


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """'key: old -> new; ...', then the overrides that keep the recorded values."""
    listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changes)
    keep = " ".join(f"{name}={_override(old)}" for name, old, _ in changes)
    return f"{listed} (to keep the recorded values, pass {keep})"


def _override(value: Any) -> str:
    """A value as a command-line override writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    return "''" if value == "" else str(value).replace(" ", "")


def recorded_settings(payload: dict[str, Any], now: dict[str, Any], run_config: Path,
                      schema: type) -> Optional[dict[str, Any]]:
    """The settings checkpoint ``payload`` was written under: recorded in it, or for one of
    the HASH_ONLY_RELEASES found behind its hash, read either from today's values (nothing
    changed) or from ``run_config``, the config.yaml of the checkpoint's run directory (which
    names what changed); None if neither gives its hash."""
    if "settings" in payload:
        return payload["settings"]
    readings = [now]
    if run_config.is_file():
        stored = keys_in_yaml_file(run_config, schema)
        readings.append({name: stored[name] for name in now if name in stored})
    for reading in readings:
        found = settings_behind_hash(payload["config_hash"], reading, schema)
        if found is not None:
            return found
    return None


def settings_behind_hash(old_hash: str, reading: dict[str, Any],
                         schema: type) -> Optional[dict[str, Any]]:
    """The settings a checkpoint of a HASH_ONLY_RELEASES build was written under, if they are
    ``reading``'s values of the keys that build knew (the keys added since are left out, for
    :func:`with_legacy` to fill); None if no such subset gives ``old_hash``.

    Each build hashed the hashed keys it had; keys came in groups, one per commit, and a
    branch build may have had any mix of them, so every mix is tried (2^5 hashes today)."""
    known = declarations(schema)
    groups = sorted({known[name].key.since for name in reading} & set(HASH_ONLY_RELEASES))
    for count in range(len(groups) + 1):
        for chosen in itertools.combinations(groups, count):
            candidate = {name: value for name, value in reading.items()
                         if known[name].key.since in ("", *chosen)}
            if settings_hash(candidate) == old_hash:
                return candidate
    return None
