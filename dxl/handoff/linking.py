"""Linking to the engine a ticket names, for an operation on its offer: the live link if there
is one, else a new one to the ticket's endpoint, set up once per peer however many operations
towards it start at the same time."""

from __future__ import annotations

import asyncio
import functools

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
        # one link setup per peer at a time, shared by every operation towards that peer; an
        # entry lives while its setup runs (a ticket may name any cluster id: none stays behind)
        self._setups: dict[int, asyncio.Future[Link | None]] = {}

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
            setup = self._setup(t, timeout)
            try:
                link = await asyncio.shield(setup)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not setup.cancelled() or (task is not None and task.cancelling()):
                    raise  # this operation was cancelled
                link = None  # the setup was: the engine is closing
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

    def _setup(self, t: Ticket, timeout: float) -> asyncio.Future[Link | None]:
        """The link setup towards the ticket's engine: the one running, else a new one. It runs
        in a task of the engine's, not in the operation that started it, and the operation waits
        on it shielded: an operation cancelled meanwhile (a request aborted while its fetch was
        linking) leaves the setup to finish. Cut short, the peer would see a link begun and
        dropped, and would refuse the next one from us while it still sets that one up; the
        abort that follows the cancel, which needs that link, would then never reach it."""
        setup = self._setups.get(t.cluster_id)
        if setup is None:
            timeout_ms = max(1, int(min(timeout, 30) * 1000))
            setup = asyncio.ensure_future(
                self._engine.link_endpoint(t.cluster_id, parse_endpoint(t.endpoint), timeout_ms)
            )
            self._setups[t.cluster_id] = setup
            setup.add_done_callback(functools.partial(self._setup_done, t.cluster_id))
            self._engine.spawn(setup)  # the engine waits for it when it closes
        return setup

    def _setup_done(self, cluster_id: int, setup: asyncio.Future[Link | None]) -> None:
        if self._setups.get(cluster_id) is setup:
            del self._setups[cluster_id]
        if not setup.cancelled():
            setup.exception()  # retrieved: the operations waiting on it report it

    def close(self) -> None:
        """Engine shutdown: the setups still running stop (their operations fail)."""
        for setup in list(self._setups.values()):
            setup.cancel()

    def __len__(self) -> int:
        """Peers that link setups are in progress towards."""
        return len(self._setups)
