"""Linking to the engine a ticket names, for an operation on its offer: the live link if there
is one, else a new one to the ticket's endpoint, set up once per peer however many operations
towards it start at the same time."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..control.wire import MAX_TOKEN, is_token
from ..errors import LLMStatusCode, param_invalid
from .counters import HandoffStats, fetch_failed
from .port import EnginePort, Link
from .ticket import Ticket, parse_endpoint


def check_token(op: str, t: Ticket) -> None:
    """A ticket's token must be as offers make them (hex digits, bounded): anything else could
    name no offer, and must not reach a peer (or our own offer table). Its endpoint must be an
    "ip:port" (LLM_PARAM_INVALID otherwise, whether or not it is needed now)."""
    if not is_token(t.token):
        raise param_invalid(op, f"the ticket's token must be 1 to {MAX_TOKEN} hex digits")
    parse_endpoint(t.endpoint)


class TicketLinker:
    """The link to a ticket's engine, checked to be the incarnation the ticket names."""

    def __init__(self, engine: EnginePort, stats: HandoffStats) -> None:
        self._engine = engine
        self._stats = stats
        # one link setup per peer at a time; an entry lives while operations towards that peer
        # wait for it (a ticket may name any cluster id: none may stay behind)
        self._setups: dict[int, _Setup] = {}

    def live_link(self, cluster_id: int) -> Link | None:
        """The live link to ``cluster_id``, if any (without linking)."""
        return self._engine.live_link(cluster_id)

    async def link_to(
        self, op: str, t: Ticket, timeout: float, partial: list[int] | None = None
    ) -> Link:
        """The live link to the engine a ticket names (linking to its endpoint if needed); a
        ticket of another incarnation (the offerer restarted) or engine is refused."""
        check_token(op, t)
        if t.cluster_id == self._engine.cluster_id:
            raise param_invalid(op, "the ticket names this engine")
        link = self._engine.live_link(t.cluster_id)
        if link is None:
            # the first of several operations towards a peer links; the others wait for it
            # (a second link_clusters meanwhile would only answer LLM_PROCESSING_LINK)
            setup = self._setups.setdefault(t.cluster_id, _Setup())
            setup.users += 1
            try:
                async with setup.lock:
                    link = self._engine.live_link(t.cluster_id)
                    if link is None:
                        timeout_ms = max(1, int(min(timeout, 30) * 1000))
                        link = await self._engine.link_endpoint(
                            t.cluster_id, parse_endpoint(t.endpoint), timeout_ms
                        )
            finally:
                setup.users -= 1
                if setup.users == 0:
                    del self._setups[t.cluster_id]
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

    def __len__(self) -> int:
        """Peers that link setups are in progress (or awaited) towards."""
        return len(self._setups)


@dataclass(slots=True)
class _Setup:
    """The link setup towards one peer, and how many operations wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
