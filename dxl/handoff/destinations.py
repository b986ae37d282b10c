"""Our destination offers (push mode, the offering side): one engine claims an offer, tells us
as its pushes land (we call the offer's ``on_layer``), and completes it. From the claim on, the
lease bounds the pusher's progress: each push renews it."""

from __future__ import annotations

import inspect
import logging

from ..control import messages as m
from ..errors import LLMStatusCode
from .counters import HandoffStats
from .leases import Leases
from .port import Link
from .state import OfferTable
from .ticket import Ended

log = logging.getLogger("dxl")
Code = LLMStatusCode


class DestinationOffers:
    """Answers ``claim``, ``pushed`` and ``complete`` messages for our push-mode offers."""

    def __init__(self, offers: OfferTable, leases: Leases, stats: HandoffStats) -> None:
        self._offers = offers
        self._leases = leases
        self._stats = stats

    async def on_claim(self, link: Link, msg: m.Claim) -> None:
        """An engine will push into one of our offers (the same one may claim it again)."""
        offer = self._offers.get(msg.offer)
        if offer is None or offer.kind != "push" or not offer.token_ok(msg.token):
            link.channel.ack(msg.rid, int(Code.LLM_KV_CACHE_NOT_EXIST), "no such live offer")
            return
        why = offer.mismatch(
            msg.cache,
            msg.layers,
            msg.tensors_per_layer,
            msg.block_bytes,
            msg.num_tensors,
        )
        if not why and msg.blocks != offer.blocks.tolist():
            why = "the ticket's blocks are not the offer's"
        if why:  # an edited ticket: refused, and the offer stays live for its real pusher
            link.channel.ack(msg.rid, int(Code.LLM_PARAM_INVALID), f"claim refused: {why}")
            return
        if offer.claimer is not None and offer.claimer is not link:
            link.channel.ack(msg.rid, int(Code.LLM_REPEAT_REQUEST), "claimed by another engine")
            return
        offer.claimer = link
        self._leases.arm(offer)  # from now on the lease bounds the pusher's progress
        link.channel.ack(msg.rid)

    async def on_pushed(self, link: Link, msg: m.Pushed) -> None:
        """Layers [lo, hi) of one of our offers landed."""
        offer = self._offers.get(msg.offer)
        if offer is None or offer.claimer is not link:
            link.channel.ack(msg.rid, int(Code.LLM_KV_CACHE_NOT_EXIST), "no such claimed offer")
            return
        span = offer.layer_span()
        if not span.start <= msg.lo < msg.hi <= span.stop:
            link.channel.ack(
                msg.rid, int(Code.LLM_PARAM_INVALID), f"layers [{msg.lo}, {msg.hi}) not in {span}"
            )
            return
        self._leases.arm(offer)
        landed = (msg.hi - msg.lo) * offer.tnpl * int(offer.blocks.size)
        landed *= offer.entry.layout.unit_bytes
        self._stats.bytes_received += landed
        self._stats.count(link.peer.cluster_id, "bytes_received", landed)
        if offer.on_layer is not None:
            try:
                result = offer.on_layer(msg.lo, msg.hi)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # the application's callback: its bug is not the peer's
                log.exception("dxl: on_layer callback of %r failed", offer.request_id)
        link.channel.ack(msg.rid)

    async def on_complete(self, link: Link, msg: m.Complete) -> None:
        """The pusher is done with one of our offers (or failed): it ends, once."""
        offer = self._offers.get(msg.offer)
        if offer is None or offer.claimer is not link:
            link.channel.ack(msg.rid, int(Code.LLM_KV_CACHE_NOT_EXIST), "no such claimed offer")
            return
        if msg.code:
            self._offers.end(offer, Ended.FAILED, msg.message or "the pusher failed")
        else:
            self._offers.end(offer, Ended.DONE)
        link.channel.ack(msg.rid)

    def link_closed(self, link: Link) -> None:
        """Our offers the engine at the other end of ``link`` pushed into fail: it is lost
        mid-transfer."""
        for offer in self._offers.live_offers():
            if offer.claimer is link and offer.kind == "push":
                self._offers.end(
                    offer, Ended.FAILED, f"the pusher's link closed: {link.channel.close_reason}"
                )
