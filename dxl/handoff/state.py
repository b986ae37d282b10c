"""The handoff's records, and the table of this engine's live offers with each one's end.

:class:`Offer` is an offer of this engine, :class:`Claim` a push-mode offer of another engine
that we push into, :class:`Fetch` a fetch of ours waiting for the offerer's copy. Every
component gets the same :class:`OfferTable`, and none keeps offers of its own: an offer ends in
one place (:meth:`OfferTable.end`), exactly once, and that end is what ``finished()`` reports.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import param_invalid
from .counters import HandoffStats
from .port import Link, LocalCache
from .ticket import Ended, Finished, Ticket

log = logging.getLogger("dxl")
TicketLike = Ticket | Mapping[str, Any] | str | bytes
LayerCallback = Callable[[int, int], Awaitable[None] | None]  # (first layer, stop layer)
OfferKey = tuple[int, int]  # another engine's offer: (its cluster id, the offer id)


@dataclass(slots=True)
class Offer:
    """An offer of this engine (pull: our blocks are the source; push: the destination)."""

    offer_id: int
    kind: str
    request_id: str
    token: str
    entry: LocalCache
    blocks: np.ndarray
    layers: range | None
    tnpl: int
    lease_s: float
    timer: asyncio.TimerHandle | None = None
    claimer: Link | None = None
    ended: Ended | None = None
    aborting: bool = False
    moving: int = 0  # our copies of this offer in flight (pull mode)
    task: asyncio.Task[None] | None = None  # pull mode: the copy serving the claim
    on_layer: LayerCallback | None = None  # push mode: the decode's per-layer callback
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    created: float = field(default_factory=time.monotonic)

    def token_ok(self, token: str) -> bool:
        """``token`` is this offer's (compared in constant time: a peer may probe it); a token
        that is not ASCII (a ticket's may hold anything JSON can) is nobody's."""
        return token.isascii() and hmac.compare_digest(self.token, token)

    def mismatch(
        self, cache: int, layers: list[int], tnpl: int, block_bytes: int, num_tensors: int
    ) -> str:
        """Why a claim's or a fetch's view of this offer (from the ticket it holds) is not our
        record of it, or "" when it is: a ticket edited on its way must move nothing."""
        layout = self.entry.layout
        ours = [] if self.layers is None else [self.layers.start, self.layers.stop]
        for what, theirs, mine in (
            ("cache", cache, self.entry.cache.cache_id),
            ("layers", layers, ours),
            ("tensors per layer", tnpl, self.tnpl),
            ("block size", block_bytes, layout.unit_bytes),
            ("tensor count", num_tensors, layout.num_tensors),
        ):
            if theirs != mine:
                return f"the ticket's {what} {theirs} is not the offer's {mine}"
        return ""

    def layer_span(self) -> range:
        """The layers offered: ``layers``, or every layer of the cache."""
        if self.layers is not None:
            return self.layers
        return range(self.entry.layout.num_tensors // self.tnpl)


@dataclass(slots=True)
class Claim:
    """A push-mode offer of another engine that this engine claimed and pushes into."""

    link: Link
    ticket: Ticket
    moving: int = 0
    aborted: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class Fetch:
    """A fetch of this engine waiting for the offerer's copy."""

    link: Link
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)


class OfferTable:
    """This engine's live offers, by offer id and by request id; each ends once, into the
    queue of ends that :meth:`finished` and :meth:`poll_finished` read."""

    def __init__(self, stats: HandoffStats) -> None:
        self._stats = stats
        self._offers: dict[int, Offer] = {}
        self._by_request: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._finished: deque[Finished] = deque()
        self._finished_event = asyncio.Event()

    def __len__(self) -> int:
        return len(self._offers)

    def next_id(self) -> int:
        """An offer id the engine picks (below ``CALLER_OFFER_IDS``)."""
        return next(self._ids)

    def get(self, offer_id: int) -> Offer | None:
        return self._offers.get(offer_id)

    def for_request(self, request_id: str) -> Offer | None:
        """The live offer of ``request_id``, if any."""
        offer_id = self._by_request.get(request_id)
        return None if offer_id is None else self._offers[offer_id]

    def live_offers(self) -> list[Offer]:
        """The live offers (a copy: ending one while iterating is fine)."""
        return list(self._offers.values())

    def add(self, offer: Offer) -> None:
        self._offers[offer.offer_id] = offer
        self._by_request[offer.request_id] = offer.offer_id
        self._stats.offers += 1

    def live_by_peer(self) -> dict[int, int]:
        """Live offers per claiming engine's cluster id (-1: not claimed)."""
        counts: dict[int, int] = {}
        for offer in self._offers.values():
            peer = offer.claimer.peer.cluster_id if offer.claimer is not None else -1
            counts[peer] = counts.get(peer, 0) + 1
        return counts

    def end(self, offer: Offer, reason: Ended, detail: str = "") -> bool:
        """End an offer, once: later calls change nothing. True if this call ended it."""
        if offer.ended is not None:
            return False
        offer.ended = reason
        if offer.timer is not None:
            offer.timer.cancel()
        self._offers.pop(offer.offer_id, None)
        self._by_request.pop(offer.request_id, None)
        peer = offer.claimer.peer.cluster_id if offer.claimer is not None else None
        self._stats.ended[reason.value] += 1
        self._stats.count(peer, reason.value)
        if reason is Ended.DONE:
            self._stats.observe(peer, "done_seconds", time.monotonic() - offer.created)
        self._finished.append(
            Finished(
                offer.request_id,
                offer.offer_id,
                offer.kind,
                reason,
                peer,
                [int(b) for b in offer.blocks.tolist()],
                detail,
            )
        )
        self._finished_event.set()
        if reason is not Ended.DONE:
            log.info("dxl: handoff of %r ended %s: %s", offer.request_id, reason.value, detail)
        return True

    async def finished(self) -> AsyncIterator[Finished]:
        """Every offer of this engine that ends, as it ends (each exactly once)."""
        while True:
            while self._finished:
                yield self._finished.popleft()
            self._finished_event.clear()
            await self._finished_event.wait()

    def poll_finished(self) -> list[Finished]:
        """The offers that ended since the last call (each exactly once)."""
        out = list(self._finished)
        self._finished.clear()
        return out

    async def wait_finished(self, timeout_s: float | None = None) -> list[Finished]:
        """:meth:`poll_finished` once at least one offer ended, or after ``timeout_s`` (then
        possibly empty); ``None`` waits as long as it takes."""
        if timeout_s is not None and (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not 0 <= timeout_s < float("inf")
        ):
            raise param_invalid("wait_finished", f"timeout_s must be >= 0 s, got {timeout_s!r}")
        while not self._finished:
            self._finished_event.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._finished_event.wait()
            except TimeoutError:
                break
        return self.poll_finished()
