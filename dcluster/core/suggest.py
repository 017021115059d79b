"""Closest names by edit distance, for "did you mean" in errors about unknown names.

Why: a mistyped key (``optim.lr_scale``) among a hundred valid ones is fixed at a glance when
the error names the one or two it was meant to be; a list of all of them hides the answer.
"""
from __future__ import annotations

from typing import Iterable


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of one character."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def closest(name: str, candidates: Iterable[str]) -> list[str]:
    """The candidates nearest ``name`` (several only when equally near), if they are within a
    third of its length: a name unlike every candidate gets no suggestion rather than a random
    one. A name without a dot is also compared with each candidate's last dotted part, so
    that a key given without its section (``lr`` for ``optim.lr``) is found."""
    scored = []
    for candidate in candidates:
        distance = edit_distance(name, candidate)
        if "." not in name:
            distance = min(distance, edit_distance(name, candidate.rsplit(".", 1)[-1]) + 1)
        if distance <= max(1, len(name) // 3):
            scored.append((distance, candidate))
    best = min((distance for distance, _ in scored), default=None)
    return [candidate for distance, candidate in scored if distance == best]
