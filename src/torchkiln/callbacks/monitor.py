"""The one "did the monitored value improve" rule, and the callbacks that act on it."""

from __future__ import annotations

import math


def improved(value: float | None, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in direction `mode` ("min" or "max");
    a non-finite value never improves, and any finite value beats no best at all."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta
