"""Small, dependency-free statistics for benchmark figures."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (`fraction` 0.99 for p99): always a value that was really observed."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | int]:
    return {
        "count": len(values_ms),
        "p50_ms": percentile(values_ms, 0.50),
        "p99_ms": percentile(values_ms, 0.99),
        "max_ms": max(values_ms),
        "mean_ms": round(statistics.fmean(values_ms), 3),
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of one figure over the repeated runs (rounded: more digits are noise)."""
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }
