"""Offer leases: an offer nobody claimed expires when its lease runs out, unless the engine that
holds its ticket renews it; a claimed push-mode offer whose pusher makes no progress within one
lease is taken back (aborted), so a stalled pusher cannot hold our blocks for ever. Renewals
cannot either: past ``MAX_LEASES`` leases after the offer was made they are refused
(``LLM_TIMEOUT``) and the lease runs out as it is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..control import messages as m
from ..errors import LLMStatusCode
from .counters import HandoffStats
from .defaults import MAX_LEASES
from .port import Link
from .state import Offer, OfferTable
from .ticket import Ended

AbortOffer = Callable[[Offer, str], Awaitable[None]]
Spawn = Callable[[Awaitable[Any]], None]


class Leases:
    """Arms, re-arms and stops the lease timer of our offers, and serves ``renew`` messages."""

    def __init__(
        self, offers: OfferTable, stats: HandoffStats, spawn: Spawn, abort_offer: AbortOffer
    ) -> None:
        self._offers = offers
        self._stats = stats
        self._spawn = spawn  # the link table's: the engine waits for the abort when it closes
        self._abort_offer = abort_offer

    def arm(self, offer: Offer) -> None:
        """(Re)start the offer's lease: it runs out ``lease_s`` from now."""
        if offer.timer is not None:
            offer.timer.cancel()
        loop = asyncio.get_running_loop()
        offer.timer = loop.call_later(offer.lease_s, self._ran_out, offer.offer_id)

    @staticmethod
    def stop(offer: Offer) -> None:
        """No lease any more (a fetch claimed a pull offer: the fetch's own timeout bounds it)."""
        if offer.timer is not None:
            offer.timer.cancel()

    def _ran_out(self, offer_id: int) -> None:
        offer = self._offers.get(offer_id)
        if offer is None or offer.ended is not None:
            return
        if offer.claimer is None:
            self._offers.end(
                offer, Ended.EXPIRED, "the lease ran out before anyone claimed the offer"
            )
        elif offer.kind == "push":  # the pusher stopped making progress: take the blocks back
            self._spawn(self._abort_offer(offer, "the pusher made no progress in its lease"))

    async def on_renew(self, link: Link, msg: m.Renew) -> None:
        """The engine holding a ticket of ours is not ready yet: the lease starts over."""
        offer = self._offers.get(msg.offer)
        if offer is None or not offer.token_ok(msg.token) or offer.claimer is not None:
            link.channel.ack(msg.rid, int(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST), "no live offer")
            return
        if time.monotonic() + offer.lease_s > offer.created + MAX_LEASES * offer.lease_s:
            # a ticket holder cannot keep our blocks for ever: the lease runs out as it is
            link.channel.ack(
                msg.rid,
                int(LLMStatusCode.LLM_TIMEOUT),
                f"the offer may be renewed up to {MAX_LEASES} leases after it was made",
            )
            return
        self.arm(offer)
        self._stats.count(link.peer.cluster_id, "renewals")
        self._stats.renewals_received += 1
        link.channel.ack(msg.rid)
