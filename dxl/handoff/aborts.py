"""Aborting handoffs, from either side: an offer of ours (our copy or the claimer's pushes stop
first), or another engine's offer that we fetch from or push into (the engine writing into our
blocks confirms it stopped); and the ``abort`` messages peers send us. An abort that lost the
race against the offer's end is no error: the offer ended once, the abort changes nothing."""

from __future__ import annotations

import asyncio
import contextlib

from ..control import messages as m
from ..errors import LLMException
from .defaults import ABORT_TIMEOUT_S
from .fence import WriterFence
from .fetching import Fetching
from .linking import TicketLinker, check_token
from .port import EnginePort, Link
from .pushing import Pushing
from .state import Offer, OfferTable, TicketLike
from .ticket import Ended, Ticket


class Aborts:
    """Cancels offers of ours and handoffs of ours into or from other engines' offers."""

    def __init__(
        self,
        engine: EnginePort,
        offers: OfferTable,
        fetching: Fetching,
        pushing: Pushing,
        linker: TicketLinker,
        fence: WriterFence,
    ) -> None:
        self._engine = engine
        self._offers = offers
        self._fetching = fetching
        self._pushing = pushing
        self._linker = linker
        self._fence = fence

    async def abort(self, ticket: TicketLike | str) -> None:
        """Cancel an offer: ours (by ticket or request id), or one we fetch from or push into.
        Returns once no copy of it is in flight and none will start; the other engine is told
        (linked to first if need be). An offer that ended already (the abort lost the race) is
        no error: nothing changes."""
        if isinstance(ticket, str):
            offer = self._offers.for_request(ticket)
            if offer is not None:
                await self.abort_offer(offer, "aborted here")
                return
        if isinstance(ticket, str) and not ticket.lstrip().startswith("{"):
            return  # a request id whose offer ended already (it lost the race): nothing to do
        t = Ticket.of(ticket)
        check_token("abort", t)
        if t.cluster_id == self._engine.cluster_id and t.incarnation == self._engine.incarnation:
            mine = self._offers.get(t.offer_id)
            if mine is not None and mine.token_ok(t.token):
                await self.abort_offer(mine, "aborted here")
            return
        key = (t.cluster_id, t.offer_id)
        await self._pushing.stop_pushing(key)  # push mode: we stop pushing, then tell the offerer
        link = self._linker.live_link(t.cluster_id)
        if link is None:  # tell the offerer even if we never linked (we need nothing of it);
            # an operation of ours linking to it meanwhile: link_to waits for that setup
            with contextlib.suppress(LLMException):
                link = await self._linker.link_to("abort", t, ABORT_TIMEOUT_S)
        self._pushing.drop_claim(key)  # a push that asked for it meanwhile: its answer is void
        if link is None or link.peer.incarnation != t.incarnation:
            return
        fetching = self._fetching.in_flight(key)
        if fetching is not None and fetching.link is link:  # it writes our blocks: it must stop
            await self._fence.stop_writer(link, offer=t.offer_id, token=t.token, mine=False)
        else:  # we write theirs (push) or nothing: telling it is a courtesy
            with contextlib.suppress(LLMException):
                await link.channel.request(
                    m.Abort(offer=t.offer_id, token=t.token, mine=False), ABORT_TIMEOUT_S
                )

    async def abort_offer(self, offer: Offer, why: str) -> None:
        """Abort one of our offers: stop our copy (pull) or the claimer's (push) first."""
        if offer.ended is not None:
            return
        offer.aborting = True
        if offer.kind == "pull" and offer.task is not None:
            await asyncio.gather(offer.task, return_exceptions=True)  # it ends the offer
        elif offer.kind == "push" and offer.claimer is not None:
            await self._fence.stop_writer(
                offer.claimer, offer=offer.offer_id, token=offer.token, mine=True
            )
        self._offers.end(offer, Ended.ABORTED, why)

    async def on_abort(self, link: Link, msg: m.Abort) -> None:
        """A peer aborts: its offer that we push into (we stop, then confirm), or ours that it
        fetches or pushes into."""
        if msg.mine:  # the sender's offer, which we push into: stop, then confirm
            await self._pushing.stop_pushing((link.peer.cluster_id, msg.offer))
        else:  # our offer, which the sender fetches or pushes into
            offer = self._offers.get(msg.offer)
            if offer is not None and offer.token_ok(msg.token):
                if offer.kind == "pull":
                    await self.abort_offer(offer, "aborted by the fetcher")
                else:  # the claimer itself aborts: it stopped pushing already
                    self._offers.end(offer, Ended.ABORTED, "aborted by the pusher")
        link.channel.ack(msg.rid)

    async def abort_all(self, why: str) -> None:
        """Engine shutdown: every live offer ends aborted, after our copy of it stopped. The
        claimer of a push-mode offer is not asked to stop: the engine closes its link next."""
        for offer in self._offers.live_offers():
            offer.aborting = True
            if offer.task is not None:
                await asyncio.gather(offer.task, return_exceptions=True)
            self._offers.end(offer, Ended.ABORTED, why)
