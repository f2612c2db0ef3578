"""Reward functions for `reward.fn=module:function` that need no model: the smoke
experiments' rewards, and examples of the interface (prompts and responses in, one float
per response out)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["concise", "distinct_words"]


def concise(prompts: Sequence[str], responses: Sequence[str], target: int = 8) -> list[float]:
    """Highest (0) for a response of `target` words, one point lower per `target` words off."""
    return [-abs(len(r.split()) - target) / target for r in responses]


def distinct_words(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The share of a response's words that are distinct (0 for an empty response)."""
    out = []
    for r in responses:
        words = r.split()
        out.append(len(set(words)) / len(words) if words else 0.0)
    return out
