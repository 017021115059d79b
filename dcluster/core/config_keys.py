"""One declaration per config key, made beside its field in dcluster/core/config.py (a method's
keys: in its folder's config.py), and what is derived from the declarations: the value checks,
which keys change a run's results (hashed), the values that reproduce the behaviour from before a
key existed (legacy), the configuration reference (dcluster/config_reference.py) and ``dcluster
train --help``.

Why it matters: a run of 500 epochs outlives many releases of dcluster. A checkpoint records
the settings that shaped it; a newer dcluster reads the keys it lacks at their legacy values,
so adding a key never strands a run, and only a real change of a hashed setting is refused.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional


class _NoLegacy:
    """The legacy of a key that existed in the first release: there is no "before"."""

    def __repr__(self) -> str:
        return "NO_LEGACY"


NO_LEGACY: Any = _NoLegacy()


@dataclass(frozen=True)
class SameAs:
    """A legacy value that is another key's value: before ``extract.batch_size`` existed, the
    feature pass ran at ``optim.batch_size``."""
    key: str

    def __str__(self) -> str:
        return f"the value of {self.key}"


_AT_LEAST = re.compile(r"(>=|>) (-?[0-9.]+)")
_INTERVAL = re.compile(r"([\[(])(-?[0-9.]+), (-?[0-9.]+)([\])])")


@dataclass(frozen=True)
class Key:
    """What a key is, besides its type and default (the dataclass field holds those)."""
    doc: str  # what it means, for the reference and --help: one or two sentences
    choices: tuple[Any, ...] = ()  # the values allowed ("" among them: may be empty)
    bounds: str = ""  # "> 0", ">= 0", ">= 2" or an interval "[0, 1)", "(0, 1]", "(0, 1)"
    # True: changes what the run computes, so a resume under another value is refused;
    # False: only how it executes or where it lands (epochs, workers, paths, Slurm...)
    hashed: bool = True
    since: str = ""  # the commit that added the key; "": in the first release (3645733)
    legacy: Any = NO_LEGACY  # the value that reproduces the behaviour before the key existed
    # (key, value): the key changes results only while that key has that value (the feature
    # bank's settings under clustering.features=training_pass), so a resume compares it then
    when: Optional[tuple[str, Any]] = None

    def __post_init__(self) -> None:
        if self.bounds and not (_AT_LEAST.fullmatch(self.bounds)
                                or _INTERVAL.fullmatch(self.bounds)):
            raise ValueError(f"bounds {self.bounds!r}: not '> x', '>= x' or an interval")

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` is not allowed for this key (the end of a ConfigError), or None."""
        if self.choices and value not in self.choices:
            named = ", ".join(str(c) for c in self.choices if c != "")
            return f"must be one of {named}" + (", or empty" if "" in self.choices else "")
        if not self.bounds:
            return None
        at_least = _AT_LEAST.fullmatch(self.bounds)
        if at_least:
            op, low = at_least[1], float(at_least[2])
            if (value > low) if op == ">" else (value >= low):
                return None
            if low == 0:
                return "must be positive" if op == ">" else "must not be negative"
            return f"must be {'more than' if op == '>' else 'at least'} {at_least[2]}"
        interval = _INTERVAL.fullmatch(self.bounds)
        assert interval is not None  # checked in __post_init__
        low, high = float(interval[2]), float(interval[3])
        above = value >= low if interval[1] == "[" else value > low
        below = value <= high if interval[4] == "]" else value < high
        return None if above and below else f"must be in {self.bounds}"


def key(default: Any, doc: str, **declared: Any) -> Any:
    """A config field with its declaration (see :class:`Key` for ``declared``)."""
    metadata = {"key": Key(doc, **declared)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def execution_only(cls: type) -> type:
    """Class decorator: none of this section's keys changes what a run computes (Slurm's
    resources, what `dcluster eval` measures afterwards)."""
    cls.__execution_only__ = True  # type: ignore[attr-defined]
    return cls


@dataclass(frozen=True)
class Declared:
    """A key as the schema declares it, under its dotted name."""
    name: str
    type: str  # "int", "str", "list[int]"...
    default: Any
    key: Key  # with ``hashed`` already false in an execution-only section


def _type_name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


@lru_cache(maxsize=None)
def _walk(schema: type, prefix: str) -> tuple[Declared, ...]:
    hints = typing.get_type_hints(schema)
    found: list[Declared] = []
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            found.extend(_walk(kind, f"{prefix}{f.name}."))
            continue
        if "key" not in f.metadata:
            raise TypeError(f"config field {prefix}{f.name} is not declared with key()")
        declared: Key = f.metadata["key"]
        if getattr(schema, "__execution_only__", False):
            declared = dataclasses.replace(declared, hashed=False)
        missing = f.default is dataclasses.MISSING
        default = f.default_factory() if missing else f.default  # type: ignore[misc]
        found.append(Declared(f"{prefix}{f.name}", _type_name(kind), default, declared))
    return tuple(found)


def declarations(schema: type) -> dict[str, Declared]:
    """Every key of the dataclass tree ``schema`` by dotted name, in declaration order."""
    return {d.name: d for d in _walk(schema, "")}


def hashed_names(schema: type) -> list[str]:
    return [name for name, d in declarations(schema).items() if d.key.hashed]
