"""Request handoff: offer -> ticket -> fetch -> done, with leases, aborts and exactly-once ends.

**Pull mode** (the prefill's blocks are the source). The prefill calls :meth:`Handoff.offer`:
the blocks are held for the request, under a lease, and a :class:`~dxl.handoff.Ticket` comes
back for the router. The decode calls :meth:`Handoff.fetch` with the ticket and its own
destination blocks: it links if needed and asks for the offer; the *prefill* then writes the
blocks into the decode's (its transport pushes them, whole or layer by layer), and tells the
decode how it ended. **Push mode** (the decode's blocks are the destination) mirrors it: the
decode offers destination blocks (:meth:`Handoff.offer_destination`); the prefill claims the
offer and pushes into it as layers finish (:meth:`Handoff.push`), then :meth:`Handoff.complete`.

In both modes the engine that owns the source blocks performs the copy, so an offer is fenced
on every transport alike: an offer that ended has no copy in flight (ending waits for the copy
that runs), and none starts after; a fetcher that gives up (timeout, abort) gets the holder's
confirmation that nothing will write into its blocks any more before its call returns. Each
offer ends exactly once, with a reason (:class:`~dxl.handoff.Ended`): done, failed, aborted, or
expired (the lease ran out before anyone claimed it; a decode that is not ready renews it, and a
fetch waiting for a free slot renews it by itself). The offering side sees every end in
:meth:`Handoff.finished` / :meth:`Handoff.poll_finished`, after which the blocks may be reused.

The handoff is a facade over components with one job each (docs/handoff.md has the protocol):

=======================  =======================================================================
component                job
=======================  =======================================================================
``OfferTable``           our live offers, each one's end exactly once, the queue of ends
``Leases``               offer leases: expiry, renewals, a stalled pusher's offer taken back
``Offering``             making offers: checks, the record, the ticket
``FetchServer``          pull mode, offering side: serving a fetch (the copy runs here)
``DestinationOffers``    push mode, offering side: claims, pushed layers, completion
``Fetching``             pull mode, fetching side: fetches, their slots, layer callbacks
``Pushing``              push mode, pushing side: claims of ours and the pushes into them
``Aborts``               aborts from either side, and the peers' ``abort`` messages
``WriterFence``          stopping an engine that writes into our blocks, and knowing it stopped
``TicketLinker``         the link to a ticket's engine (one link setup per peer at a time)
``HandoffStats``         counters and histograms, per engine and per peer
=======================  =======================================================================
"""

from __future__ import annotations

from typing import Any

from .._forward import delegate, forward
from .._validate import check_uint32
from .aborts import Aborts
from .counters import HandoffStats
from .defaults import (
    ABORT_TIMEOUT_S,
    CALLER_OFFER_IDS,
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_FETCHES,
)
from .destinations import DestinationOffers
from .fence import WriterFence
from .fetching import Fetching
from .leases import Leases
from .linking import TicketLinker
from .offers import Offering
from .port import EnginePort, Link
from .pushing import Pushing
from .serving import FetchServer
from .slots import Slots
from .state import LayerCallback, OfferTable, TicketLike

__all__ = [
    "ABORT_TIMEOUT_S",
    "CALLER_OFFER_IDS",
    "DEFAULT_FETCH_TIMEOUT_S",
    "DEFAULT_LEASE_S",
    "DEFAULT_MAX_FETCHES",
    "Handoff",
    "HandoffStats",
    "LayerCallback",
    "TicketLike",
]


class Handoff:
    """The handoff layer of one engine (see the module docstring); ``engine.handoff``."""

    def __init__(self, engine: EnginePort) -> None:
        """Built by the engine it serves, from its port (:mod:`dxl.handoff.port`); its
        settings are the engine's ``dxl.Handoff*`` options, each component given the ones it
        uses."""
        settings = engine.options.handoff
        stats = self._stats = HandoffStats()
        offers = self._offers = OfferTable(stats)
        slots = self._slots = Slots(settings.max_fetches)
        linker = self._linker = TicketLinker(engine, stats)
        fence = WriterFence(engine)
        fetching = self._fetching = Fetching(
            engine, linker, fence, slots, stats, settings.fetch_timeout_s
        )
        pushing = self._pushing = Pushing(engine, linker, stats, settings.fetch_timeout_s)
        aborts = self._aborts = Aborts(engine, offers, fetching, pushing, linker, fence)
        leases = Leases(offers, stats, engine.spawn, aborts.abort_offer)
        self._offering = Offering(engine, offers, leases, settings.lease_s)
        serving = FetchServer(engine, offers, leases, stats)
        destinations = self._destinations = DestinationOffers(offers, leases, stats)
        for kind, handler in (
            ("fetch", serving.on_fetch),
            ("layer", fetching.on_layer),
            ("fetched", fetching.on_fetched),
            ("renew", leases.on_renew),
            ("claim", destinations.on_claim),
            ("pushed", destinations.on_pushed),
            ("complete", destinations.on_complete),
            ("abort", aborts.on_abort),
        ):
            engine.on(kind, handler)
        engine.watch_closed(self._on_link_closed)

    @property
    def max_fetches(self) -> int:
        """Fetches of ours in flight at once; the others wait for a slot, renewing their
        offers' leases meanwhile. Takes effect at once, for fetches already waiting too
        (0 holds every new fetch until it is raised)."""
        return self._slots.limit

    @max_fetches.setter
    def max_fetches(self, value: int) -> None:
        check_uint32("max_fetches", value)
        self._slots.limit = value

    # Operations: written once, on the component that does each (signature, checks, docstring).
    # offering side
    offer = forward("_offering", Offering.offer)
    offer_destination = forward("_offering", Offering.offer_destination)
    finished = delegate("_offers", OfferTable.finished)
    poll_finished = delegate("_offers", OfferTable.poll_finished)
    wait_finished = forward("_offers", OfferTable.wait_finished)

    def live(self) -> int:
        """Offers of this engine not ended yet."""
        return len(self._offers)

    # ending, renewing
    abort = forward("_aborts", Aborts.abort)
    renew = forward("_fetching", Fetching.renew)

    # fetching side (pull mode); pushing side (push mode)
    fetch = forward("_fetching", Fetching.fetch)
    push = forward("_pushing", Pushing.push)
    complete = forward("_pushing", Pushing.complete)

    # ================================================================== both sides
    def stats(self) -> dict[str, Any]:
        """Counters of this engine's handoffs, and per peer (cluster id; -1: offers nobody
        claimed). ``linking``: peers a link setup for a ticket runs towards. ``per_peer``
        counters: ``done``/``failed``/``aborted``/``expired`` (our offers' ends),
        ``bytes_sent``/``bytes_received``, ``fetched``/``fetch_failed`` (our fetches),
        ``renewals`` (of our offers, received) and ``renewals_sent``. Histograms
        (:meth:`Histogram.snapshot`, seconds): ``fetch_seconds`` (our fetches) and
        ``done_seconds`` (our offers that ended done, from ``offer()``), per peer in
        ``per_peer_hist``. See dxl/handoff/metrics.py for Prometheus."""
        return self._stats.snapshot(
            offers_live=len(self._offers),
            live_by_peer=self._offers.live_by_peer(),
            fetches_in_flight=len(self._fetching),
            claims=len(self._pushing),
            max_fetches=self.max_fetches,
            linking=len(self._linker),
        )

    async def close(self) -> None:
        """Engine shutdown: every live offer ends (aborted), every fetch fails."""
        self._linker.close()
        await self._aborts.abort_all("the engine closed")
        self._fetching.close()

    def _on_link_closed(self, link: Link) -> None:
        """The engine at the other end is lost: our offers it pushed into fail, our fetches
        from it fail, our claims on its offers end."""
        self._destinations.link_closed(link)
        self._fetching.link_closed(link)
        self._pushing.link_closed(link)
