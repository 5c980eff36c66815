"""Checks of the sampling values that several entry points take (a request, a recipe's
``[generation]`` or ``[action]`` table, the decoding loop, verbalized confidence): one
rule and one message each, naming the key as the caller spelt it.

Example:
    >>> check_top_p(0.9, "generation.top_p")
    >>> check_top_p(0, "action.top_p")
    Traceback (most recent call last):
    ...
    ValueError: action.top_p: must be in (0, 1], got 0
    >>> check_temperature(float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: temperature: must be a finite number >= 0, got inf
"""

from __future__ import annotations

import math

__all__ = ["check_temperature", "check_top_p"]


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_temperature(value, name: str = "temperature") -> None:
    """A sampling temperature: a finite number >= 0 (0: greedy)."""
    if not _number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")


def check_top_p(value, name: str = "top_p") -> None:
    """A nucleus mass: a number in (0, 1]."""
    if not _number(value) or not 0 < value <= 1:
        raise ValueError(f"{name}: must be in (0, 1], got {value!r}")
