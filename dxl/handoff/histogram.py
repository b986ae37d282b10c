"""A cumulative latency histogram with fixed buckets (Prometheus' shape: counts only grow)."""

from __future__ import annotations

import bisect
from typing import Any

# seconds: 0.5 ms .. 60 s; a 64 MiB handoff takes ~5-50 ms, a waiting offer up to its lease
BOUNDS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Histogram:
    """Observations in seconds, counted per bucket ``<= bound`` (the last bucket is +Inf)."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BOUNDS_S) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(BOUNDS_S, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def snapshot(self) -> dict[str, Any]:
        """``{"le": bounds, "cumulative": counts <= each bound, "count", "sum"}`` (seconds);
        ``count`` is the +Inf bucket."""
        cumulative, total = [], 0
        for n in self.buckets[:-1]:
            total += n
            cumulative.append(total)
        return {
            "le": list(BOUNDS_S),
            "cumulative": cumulative,
            "count": self.count,
            "sum": self.sum,
        }
