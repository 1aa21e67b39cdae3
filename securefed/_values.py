"""Type checks that config validation shares: a bool is never a number here."""

from __future__ import annotations

import math

__all__ = ["is_int", "is_real", "is_count"]


def is_int(value: object) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: object) -> bool:
    """An int >= 1, not a bool."""
    return is_int(value) and value >= 1  # type: ignore[operator]
