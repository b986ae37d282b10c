"""Linking to the engine a ticket names, for an operation on its offer: the live link if there
is one, else a new one to the ticket's endpoint, set up once per peer however many operations
towards it start at the same time."""

from __future__ import annotations

import asyncio

from ..errors import LLMStatusCode, param_invalid
from .counters import HandoffStats, fetch_failed
from .port import EnginePort, Link
from .ticket import Ticket, parse_endpoint


class TicketLinker:
    """The link to a ticket's engine, checked to be the incarnation the ticket names."""

    def __init__(self, engine: EnginePort, stats: HandoffStats) -> None:
        self._engine = engine
        self._stats = stats
        self._setups: dict[int, asyncio.Lock] = {}  # one link setup per peer at a time

    def live_link(self, cluster_id: int) -> Link | None:
        """The live link to ``cluster_id``, if any (without linking)."""
        return self._engine.live_link(cluster_id)

    async def link_to(
        self, op: str, t: Ticket, timeout: float, partial: list[int] | None = None
    ) -> Link:
        """The live link to the engine a ticket names (linking to its endpoint if needed); a
        ticket of another incarnation (the offerer restarted) or engine is refused."""
        if t.cluster_id == self._engine.cluster_id:
            raise param_invalid(op, "the ticket names this engine")
        link = self._engine.live_link(t.cluster_id)
        if link is None:
            # the first of several operations towards a peer links; the others wait for it
            # (a second link_clusters meanwhile would only answer LLM_PROCESSING_LINK)
            async with self._setups.setdefault(t.cluster_id, asyncio.Lock()):
                link = self._engine.live_link(t.cluster_id)
                if link is None:
                    timeout_ms = max(1, int(min(timeout, 30) * 1000))
                    link = await self._engine.link_endpoint(
                        t.cluster_id, parse_endpoint(t.endpoint), timeout_ms
                    )
        if link is None:
            raise fetch_failed(
                self._stats,
                t,
                LLMStatusCode.LLM_LINK_FAILED,
                f"cannot link to {t.endpoint}",
                partial or [],
            )
        if link.peer.incarnation != t.incarnation:
            raise fetch_failed(
                self._stats,
                t,
                LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                "the ticket is for another incarnation of that engine (it restarted)",
                partial or [],
            )
        return link
