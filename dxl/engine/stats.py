"""Per-operation counters: operations, bytes, pieces, errors by status, latency percentiles."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

import numpy as np

LATENCY_WINDOW = 4096  # recent operations kept for percentiles; bounded memory


class OpStats:
    """Counters of one operation kind (pull or push) on one link or engine-wide."""

    __slots__ = ("bytes", "errors", "latencies_us", "ops", "pieces")

    def __init__(self) -> None:
        self.ops = 0
        self.bytes = 0
        self.pieces = 0
        self.errors: Counter[str] = Counter()
        self.latencies_us: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def record(self, nbytes: int, pieces: int, seconds: float) -> None:
        self.ops += 1
        self.bytes += nbytes
        self.pieces += pieces
        self.latencies_us.append(seconds * 1e6)

    def record_error(self, status_name: str) -> None:
        self.errors[status_name] += 1

    def snapshot(self) -> dict[str, Any]:
        lat = np.fromiter(self.latencies_us, dtype=np.float64)
        p50, p99 = np.percentile(lat, [50, 99]).tolist() if lat.size else (None, None)
        return {
            "ops": self.ops,
            "bytes": self.bytes,
            "pieces": self.pieces,
            "errors": dict(self.errors),
            "p50_us": p50,
            "p99_us": p99,
        }
