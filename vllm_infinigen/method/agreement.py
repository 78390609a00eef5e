"""Greedy agreement: how long a sparse run's greedy output follows dense."""

from __future__ import annotations


def prefix_agreement(reference: list[int], other: list[int]) -> float:
    """Share of ``reference``'s tokens that ``other`` repeats before their
    first difference (1.0: identical; a strict measure, since one different
    token sends the continuations their own ways)."""
    same = 0
    for a, b in zip(reference, other, strict=False):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)
