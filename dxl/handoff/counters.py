"""The handoff's counters and latency histograms, per engine and per peer, and the one place a
failed fetch or push of ours is counted (:func:`fetch_failed`)."""

from __future__ import annotations

from typing import Any

from ..errors import LLMStatusCode
from .histogram import Histogram
from .port import OpStats
from .ticket import Ended, FetchError, Ticket


class HandoffStats:
    """Counters per engine and per peer (``stats()`` gives them as a dict)."""

    def __init__(self) -> None:
        self.offers = 0
        self.ended: dict[str, int] = {e.value: 0 for e in Ended}
        self.renewals = 0  # renewals this engine made (renew(), and fetches waiting for a slot)
        self.renewals_received = 0  # renewals of our offers, by the engines that hold tickets
        self.bytes_sent = 0  # written by this engine: offers served (pull), pushes (push)
        self.bytes_received = 0  # written into this engine: fetches (pull), pushed layers (push)
        self.fetches = OpStats()  # latency of fetches this engine made
        self.fetch_failures: dict[str, int] = {}
        self.per_peer: dict[int, dict[str, int]] = {}
        self.fetch_seconds = Histogram()  # fetches this engine made, call to return
        self.done_seconds = Histogram()  # our offers that ended done, offer() to the end
        self.per_peer_hist: dict[int, dict[str, Histogram]] = {}

    def peer(self, cluster_id: int | None) -> dict[str, int]:
        return self.per_peer.setdefault(cluster_id if cluster_id is not None else -1, {})

    def count(self, cluster_id: int | None, what: str, n: int = 1) -> None:
        counters = self.peer(cluster_id)
        counters[what] = counters.get(what, 0) + n

    def observe(self, cluster_id: int | None, what: str, seconds: float) -> None:
        """One latency into the engine's histogram ``what`` and the peer's."""
        getattr(self, what).observe(seconds)
        peer = self.per_peer_hist.setdefault(cluster_id if cluster_id is not None else -1, {})
        peer.setdefault(what, Histogram()).observe(seconds)

    def snapshot(
        self,
        *,
        offers_live: int,
        live_by_peer: dict[int, int],
        fetches_in_flight: int,
        claims: int,
        max_fetches: int,
        linking: int,
    ) -> dict[str, Any]:
        """The counters as :meth:`dxl.handoff.Handoff.stats` reports them, with the live
        figures only the other components know (passed in)."""
        return {
            "offers_live": offers_live,
            "offers": self.offers,
            "ended": dict(self.ended),
            "renewals": self.renewals,
            "renewals_received": self.renewals_received,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "fetch": self.fetches.snapshot(),
            "fetch_failures": dict(self.fetch_failures),
            "fetches_in_flight": fetches_in_flight,
            "claims": claims,
            "max_fetches": max_fetches,
            "linking": linking,
            "live_by_peer": live_by_peer,
            "per_peer": {k: dict(v) for k, v in self.per_peer.items()},
            "fetch_seconds": self.fetch_seconds.snapshot(),
            "done_seconds": self.done_seconds.snapshot(),
            "per_peer_hist": {
                k: {name: h.snapshot() for name, h in v.items()}
                for k, v in self.per_peer_hist.items()
            },
        }


def fetch_failed(
    stats: HandoffStats, t: Ticket, code: LLMStatusCode, why: str, partial: list[int]
) -> FetchError:
    """Count a failed fetch or push of ours, and return the error its caller raises
    (``partial``: our blocks that may hold partial data)."""
    stats.fetch_failures[code.name] = stats.fetch_failures.get(code.name, 0) + 1
    stats.count(t.cluster_id, "fetch_failed")
    return FetchError(
        f"handoff of request {t.request_id!r} from cluster {t.cluster_id} failed: {why}",
        status_code=code if code != LLMStatusCode.LLM_SUCCESS else LLMStatusCode.LLM_FAILED,
        request_id=t.request_id,
        partial_blocks=partial,
    )
