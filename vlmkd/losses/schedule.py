"""Dynamic temperature (a recipe's `temperature: {start, end}`)."""

from __future__ import annotations


def linear_temperature(step: int, total: int, start: float = 5.0, end: float = 1.0) -> float:
    """tau falls linearly from `start` to `end` over `total` steps (soft targets early, sharp late)."""
    if total <= 1:
        return end
    frac = min(max(step / (total - 1), 0.0), 1.0)
    return start + (end - start) * frac
