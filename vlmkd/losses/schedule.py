"""Dynamic temperature and adaptive loss weights."""

from __future__ import annotations


def linear_temperature(step: int, total: int, start: float = 5.0, end: float = 1.0) -> float:
    """tau falls linearly from `start` to `end` over `total` steps (soft targets early, sharp late)."""
    if total <= 1:
        return end
    frac = min(max(step / (total - 1), 0.0), 1.0)
    return start + (end - start) * frac


class AdaptiveWeights:
    """Weights each KD term by its current student-teacher gap relative to its first value: a term that
    has closed its gap fades, one that lags keeps its weight (w_i = base_i * L_i(now) / L_i(first),
    clipped to [floor, cap] x base). Call `update` with detached loss values each step."""

    def __init__(self, base: dict[str, float], floor: float = 0.1, cap: float = 2.0):
        self.base, self.floor, self.cap = dict(base), floor, cap
        self.first: dict[str, float] = {}

    def update(self, values: dict[str, float]) -> dict[str, float]:
        out = {}
        for k, w in self.base.items():
            v = values.get(k)
            if v is None:
                out[k] = w
                continue
            self.first.setdefault(k, max(v, 1e-12))
            out[k] = w * min(max(v / self.first[k], self.floor), self.cap)
        return out
