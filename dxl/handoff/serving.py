"""Serving fetches of our offers (pull mode, the offering side): a fetcher's ``fetch`` claims
an offer, and this engine writes the offered blocks into the fetcher's (whole, or layer by layer,
telling it as each layer lands), then tells it how the offer ended. The copy runs here, on the
engine that owns the source blocks, so ending the offer can wait for it (the fence)."""

from __future__ import annotations

import asyncio

import numpy as np

from ..control import messages as m
from ..errors import LLMException, LLMStatusCode, fail, param_invalid
from .counters import HandoffStats
from .leases import Leases
from .port import Blocks, EnginePort, Link, RemoteCache
from .state import Offer, OfferTable
from .ticket import Ended

Code = LLMStatusCode


class FetchServer:
    """Answers ``fetch`` messages for our pull-mode offers and runs the copy of each."""

    def __init__(
        self, engine: EnginePort, offers: OfferTable, leases: Leases, stats: HandoffStats
    ) -> None:
        self._engine = engine
        self._offers = offers
        self._leases = leases
        self._stats = stats

    async def on_fetch(self, link: Link, msg: m.Fetch) -> None:
        """A fetcher claims one of our offers: check it, then copy in a task of its own (the
        offer's ``task``: an abort waits for it)."""
        offer = self._offers.get(msg.offer)
        try:
            if offer is None or offer.kind != "pull" or not offer.token_ok(msg.token):
                raise fail("fetch", Code.LLM_KV_CACHE_NOT_EXIST, "no such live offer")
            why = offer.mismatch(
                msg.src_cache,
                msg.layers,
                msg.tensors_per_layer,
                msg.block_bytes,
                msg.num_tensors,
            )
            if not why and msg.offered != offer.blocks.size:
                why = f"the ticket offers {msg.offered} blocks, the offer {offer.blocks.size}"
            if why:  # an edited ticket: refused, and the offer stays live for its real fetcher
                raise param_invalid("fetch", why)
            if offer.claimer is not None:
                raise fail("fetch", Code.LLM_REPEAT_REQUEST, "the offer was fetched already")
            remote = link.registry.caches.get(msg.cache)
            dst = _dst_blocks(offer, remote, msg.blocks)
        except LLMException as exc:
            link.channel.ack(msg.rid, int(exc.status_code), str(exc))
            return
        offer.claimer = link
        self._leases.stop(offer)
        link.channel.ack(msg.rid)
        assert remote is not None
        offer.task = asyncio.create_task(self._serve(offer, link, remote, dst, msg.per_layer))

    async def _serve(
        self, offer: Offer, link: Link, remote: RemoteCache, dst: np.ndarray, per_layer: bool
    ) -> None:
        """Write the offered blocks into the fetcher's (whole, or layer by layer), then tell it
        how the offer ended."""
        code, message = Code.LLM_SUCCESS, ""
        groups = _layer_groups(offer, per_layer)
        try:
            for lo, hi in groups:
                if offer.aborting:
                    break
                if link.closed:  # the fetcher cut us off (e.g. it saw no answer to an abort)
                    raise fail(
                        "fetch",
                        Code.LLM_LINK_FAILED,
                        f"the fetcher's link closed: {link.channel.close_reason}",
                    )
                await self._copy(offer, link, remote, dst, lo, hi)
                if per_layer:
                    link.channel.send(m.Layer(offer=offer.offer_id, lo=lo, hi=hi))
            if offer.aborting:
                code, message = Code.LLM_FAILED, "aborted"
                self._offers.end(offer, Ended.ABORTED, "aborted during the fetch")
            else:
                self._offers.end(offer, Ended.DONE)
                nbytes = _nbytes(offer, groups, dst.size)
                self._stats.count(link.peer.cluster_id, "bytes_sent", nbytes)
                self._stats.bytes_sent += nbytes
        except LLMException as exc:
            code, message = exc.status_code, str(exc)
            self._offers.end(offer, Ended.FAILED, message)
        finally:
            link.channel.send(
                m.Fetched(offer=offer.offer_id, code=int(code), message=m.clip(message))
            )

    async def _copy(
        self, offer: Offer, link: Link, remote: RemoteCache, dst: np.ndarray, lo: int, hi: int
    ) -> None:
        """One native write of layers [lo, hi) of the offer into the same layers of the remote
        cache (both sides hold the same model: layer numbers match)."""
        t = offer.tnpl
        src_bases = offer.entry.layout.addrs[lo * t : hi * t]
        dst_bases = remote.layout.addrs[lo * t : hi * t]
        bb = offer.entry.layout.unit_bytes
        src = offer.blocks[offer.blocks.size - dst.size :]  # fewer: the fetcher takes the tail

        offer.moving += 1
        offer.idle.clear()
        try:
            pieces = Blocks(dst_bases, src_bases, dst, src, bb)
            await self._engine.transfer("handoff", link, offer.entry, remote, pieces, write=True)
        finally:
            offer.moving -= 1
            if offer.moving == 0:
                offer.idle.set()


def _dst_blocks(offer: Offer, remote: RemoteCache | None, blocks: list[int]) -> np.ndarray:
    """Check a fetcher's destination against the offer (on the offering side)."""
    if remote is None or not remote.layout.blocks:
        raise fail(
            "fetch",
            Code.LLM_KV_CACHE_NOT_EXIST,
            "the destination is not a remotely accessible blocks cache of the fetcher",
        )
    dst = np.asarray(blocks, dtype=np.int64)
    if not 0 < dst.size <= offer.blocks.size or (
        dst.size and (dst.min() < 0 or dst.max() >= remote.layout.units)
    ):
        raise param_invalid("fetch", "destination blocks do not match the offer")
    if remote.layout.unit_bytes != offer.entry.layout.unit_bytes:
        raise param_invalid("fetch", "destination block size differs from the offer's")
    if remote.layout.num_tensors < offer.layer_span().stop * offer.tnpl:
        raise param_invalid("fetch", "the destination has fewer tensors than the offer's layers")
    return dst


def _layer_groups(offer: Offer, per_layer: bool) -> list[tuple[int, int]]:
    span = offer.layer_span()
    if per_layer:
        return [(layer, layer + 1) for layer in span]
    return [(span.start, span.stop)]


def _nbytes(offer: Offer, groups: list[tuple[int, int]], blocks: int) -> int:
    layers = sum(hi - lo for lo, hi in groups)
    return layers * offer.tnpl * int(blocks) * offer.entry.layout.unit_bytes
