"""The connector's transfer statistics, as vLLM's connector-stats hooks carry them (no vLLM here).

A worker records what its transfers did into a :class:`TransferStats` (under its own lock);
each step vLLM takes the data (``get_kv_connector_stats``: :meth:`TransferStats.take`), ships the
plain dict from the worker to the scheduler and on to the API server, where
``DxlKVConnectorStats`` (connector.py, a thin vLLM subclass) merges the dicts of an interval with
:func:`merge` and logs :func:`summary` as vLLM's "KV Transfer metrics" line, and
``DxlPromMetrics`` exports them on ``/metrics``. The dict holds only lists of numbers and integer
counts, so that it pickles and msgpack-encodes as vLLM requires.

Each list holds one entry per load finished in the step (a step finishes at most as many loads
as it has running requests), so nothing here grows beyond one step's or one log interval's work.
"""

from __future__ import annotations

import math
import threading
from typing import Any

__all__ = ["COUNTS", "OFFER_ENDS", "TransferStats", "empty", "is_empty", "merge", "summary"]

# Per-load observations (decode side): seconds from submitting the fetch to its end, and bytes.
LOAD_SECONDS = "load_seconds"
LOAD_BYTES = "load_bytes"
# Counts: loads that failed (decode side), offers ended by reason (prefill side).
LOADS_FAILED = "loads_failed"
OFFER_ENDS = ("done", "expired", "failed", "aborted")
COUNTS = (LOADS_FAILED, *(f"offers_{r}" for r in OFFER_ENDS))


def empty() -> dict[str, Any]:
    """A payload with nothing recorded."""
    data: dict[str, Any] = {LOAD_SECONDS: [], LOAD_BYTES: []}
    data.update(dict.fromkeys(COUNTS, 0))
    return data


def is_empty(data: dict[str, Any]) -> bool:
    return not data.get(LOAD_SECONDS) and not any(data.get(k, 0) for k in COUNTS)


def merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Add ``other`` to ``into`` (in place) and return it; keys missing on either side count as
    nothing (a payload from another dxl version still merges)."""
    for key in (LOAD_SECONDS, LOAD_BYTES):
        into.setdefault(key, []).extend(other.get(key, ()))
    for key in COUNTS:
        into[key] = int(into.get(key, 0)) + int(other.get(key, 0))
    return into


def _percentile(sorted_values: list[float], q: float) -> float:
    # nearest rank: no numpy needed, and exact for the few loads of one log interval
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


def summary(data: dict[str, Any]) -> dict[str, int | float]:
    """The interval's line, in the style of vLLM's NIXL line (``KV Transfer metrics: ...``)."""
    seconds = sorted(float(s) for s in data.get(LOAD_SECONDS, ()))
    total_bytes = sum(int(b) for b in data.get(LOAD_BYTES, ()))
    n = len(seconds)
    failed = int(data.get(LOADS_FAILED, 0))
    offers = {r: int(data.get(f"offers_{r}", 0)) for r in OFFER_ENDS}
    out: dict[str, int | float] = {}
    if n or failed or not any(offers.values()):  # a prefill's line shows only its offers
        out["Num successful loads"] = n
    if n:
        total_s = sum(seconds)
        out["Avg load time (ms)"] = round(total_s / n * 1e3, 3)
        out["P90 load time (ms)"] = round(_percentile(seconds, 0.9) * 1e3, 3)
        out["Avg MB per load"] = round(total_bytes / n / 2**20, 3)
        out["Throughput (MB/s)"] = round(total_bytes / 2**20 / total_s, 3) if total_s else 0.0
    if "Num successful loads" in out:
        out["Num failed loads"] = failed
    for reason, count in offers.items():
        if count:
            out[f"Num offers {reason}"] = count
    return out


class TransferStats:
    """What one worker's transfers did since vLLM last took the stats (thread-safe: the loop
    thread records, the model thread takes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = empty()

    def load_done(self, seconds: float, nbytes: int) -> None:
        with self._lock:
            self._data[LOAD_SECONDS].append(seconds)
            self._data[LOAD_BYTES].append(nbytes)

    def load_failed(self) -> None:
        with self._lock:
            self._data[LOADS_FAILED] += 1

    def offer_ended(self, reason: str) -> None:
        if reason not in OFFER_ENDS:
            return
        with self._lock:
            self._data[f"offers_{reason}"] += 1

    def take(self) -> dict[str, Any] | None:
        """The data recorded since the last call (then reset), or None if nothing was."""
        with self._lock:
            if is_empty(self._data):
                return None
            out, self._data = self._data, empty()
        return out
