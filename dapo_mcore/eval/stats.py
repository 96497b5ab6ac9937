"""Confidence intervals for accuracies: Wilson score interval, paired difference of two models."""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(lo, hi)`` of a binomial proportion ``correct / n``; (0, 1) when n == 0."""
    if n < 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of ``b - a`` over the same problems with a normal-approximation interval.

    ``a``/``b``: per-problem rewards (same order). Returns ``{"diff", "lo", "hi", "n", "b_only", "a_only"}``
    (``b_only``: problems only ``b`` solves).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} vs {len(b)} problems")
    n = len(a)
    if n == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "a_only": 0, "b_only": 0}
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = _z(confidence) * math.sqrt(var / n)
    return {"diff": mean, "lo": mean - half, "hi": mean + half, "n": n,
            "a_only": sum(x > 0.5 >= y for x, y in zip(a, b)), "b_only": sum(y > 0.5 >= x for x, y in zip(a, b))}
