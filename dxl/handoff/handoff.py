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
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np

from .._validate import (
    block_list,
    check_blocks_in_range,
    check_cache_arg,
    check_isinstance,
    check_uint32,
)
from ..config import EngineOptions
from ..engine.link import Link
from ..engine.linking import LinkOps
from ..engine.links import LinkTable
from ..engine.listener import Listener
from ..engine.mover import Mover
from ..engine.registry import LocalCache, RemoteCache
from ..engine.resolve import Resolver, Route
from ..engine.state import Identity, RunState
from ..errors import LLMException, LLMStatusCode, fail, param_invalid, status_from_code
from ..memory.plan import block_pieces
from ..types import Cache
from .counters import HandoffStats, fetch_failed
from .defaults import (
    ABORT_TIMEOUT_S,
    CALLER_OFFER_IDS,
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_FETCHES,
)
from .fence import WriterFence
from .linking import TicketLinker
from .slots import Slots
from .state import Claim, Fetch, LayerCallback, Offer, OfferKey, OfferTable, TicketLike
from .ticket import Ended, FetchError, Finished, Ticket

log = logging.getLogger("dxl")
Code = LLMStatusCode

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


# the records' names before the split into components, for code that imported them from here
_Offer, _Claim, _Fetch = Offer, Claim, Fetch


class Handoff:
    """The handoff layer of one engine (see the module docstring); ``engine.handoff``."""

    def __init__(
        self,
        identity: Identity,
        options: EngineOptions,
        state: RunState,
        links: LinkTable,
        linking: LinkOps,
        listener: Listener,
        mover: Mover,
        resolver: Resolver,
    ) -> None:
        self._identity = identity
        self._opts = options
        self._state = state
        self._links = links
        self._listener = listener
        self._mover = mover
        self._resolver = resolver
        self._stats = HandoffStats()
        self._offers = OfferTable(self._stats)
        self._claims: dict[OfferKey, Claim] = {}
        self._claiming: dict[OfferKey, list[Claim]] = {}  # asked for, not answered
        self._fetches: dict[OfferKey, Fetch] = {}
        self._slots = Slots(DEFAULT_MAX_FETCHES)
        self._fence = WriterFence(listener)
        self._linker = TicketLinker(identity, links, linking, self._stats)
        for kind, handler in (
            ("fetch", self._on_fetch),
            ("layer", self._on_layer),
            ("fetched", self._on_fetched),
            ("renew", self._on_renew),
            ("claim", self._on_claim),
            ("pushed", self._on_pushed),
            ("complete", self._on_complete),
            ("abort", self._on_abort),
        ):
            links.on(kind, handler)
        links.watch_closed(self._on_link_closed)

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

    # ================================================================== offering side
    async def offer(
        self,
        request_id: str,
        cache: Cache,
        block_ids: Sequence[int],
        *,
        layers: range | None = None,
        tensors_per_layer: int = 2,
        lease_s: float | None = None,
        num_tokens: int | None = None,
        offer_id: int | None = None,
        token: str | None = None,
    ) -> Ticket:
        """Hold ``block_ids`` of ``cache`` for ``request_id`` until a fetcher took them, or the
        lease (``lease_s``, default 30 s, renewable) ran out; returns the ticket for the router.

        The blocks must stay untouched until :meth:`finished` reports the offer ended.

        ``offer_id`` and ``token`` (both or neither) let a caller that must hand the ticket out
        before the offer exists choose them (a vLLM scheduler whose worker offers): the id must
        be at least ``2**32`` (the engine picks smaller ones) and not live; the token must be a
        random secret of at least 32 hex digits. The ticket is then predictable from them."""
        return self._new_offer(
            "offer",
            "pull",
            request_id,
            cache,
            block_ids,
            layers,
            tensors_per_layer,
            lease_s,
            num_tokens,
            None,
            offer_id,
            token,
        )

    async def offer_destination(
        self,
        request_id: str,
        cache: Cache,
        block_ids: Sequence[int],
        *,
        layers: range | None = None,
        tensors_per_layer: int = 2,
        lease_s: float | None = None,
        on_layer: LayerCallback | None = None,
    ) -> Ticket:
        """Push mode: offer ``block_ids`` of ``cache`` (remotely accessible) as the destination
        of ``request_id``; the engine that claims the ticket pushes into them. ``on_layer(lo,
        hi)`` is called as layers land. Ends as :meth:`offer` does."""
        if not cache.remote_accessible:
            raise param_invalid(
                "offer_destination",
                "cache must be registered with remote_accessible=True: the pusher writes it",
            )
        return self._new_offer(
            "offer_destination",
            "push",
            request_id,
            cache,
            block_ids,
            layers,
            tensors_per_layer,
            lease_s,
            None,
            on_layer,
        )

    def _new_offer(
        self,
        op: str,
        kind: str,
        request_id: str,
        cache: Cache,
        block_ids: Sequence[int],
        layers: range | None,
        tnpl: int,
        lease_s: float | None,
        num_tokens: int | None,
        on_layer: LayerCallback | None,
        offer_id: int | None = None,
        token: str | None = None,
    ) -> Ticket:
        check_isinstance("request_id", request_id, str, allow_none=False)
        check_cache_arg(op, "cache", cache)
        check_isinstance("layers", layers, range)
        if not request_id or len(request_id) > 512:
            raise param_invalid(op, "request_id must have 1..512 characters")
        if self._offers.for_request(request_id) is not None:
            raise fail(op, Code.LLM_REPEAT_REQUEST, f"request {request_id!r} is offered already")
        lease = DEFAULT_LEASE_S if lease_s is None else float(lease_s)
        if not 0 < lease <= 24 * 3600:
            raise param_invalid(op, f"lease_s must be in (0, 86400], got {lease_s}")
        self._state.require(op)
        entry = self._resolver.local(op, cache)
        if not entry.layout.blocks:
            raise param_invalid(op, "cache must be a blocks cache")
        blocks = block_list(op, "block_ids", list(block_ids))
        if blocks.size == 0:
            raise param_invalid(op, "block_ids must not be empty")
        check_blocks_in_range(op, "block_ids", blocks, entry.layout.units)
        _layer_tensors(op, entry, layers, tnpl)
        if (offer_id is None) != (token is None):
            raise param_invalid(op, "offer_id and token are chosen together, or neither")
        if offer_id is not None and token is not None:
            check_isinstance("offer_id", offer_id, int, allow_none=False)
            check_isinstance("token", token, str, allow_none=False)
            if not CALLER_OFFER_IDS <= offer_id < 1 << 63:
                raise param_invalid(
                    op, f"a chosen offer_id must be in [2**32, 2**63), got {offer_id}"
                )
            if len(token) < 32 or len(token) > 128 or not _is_hex(token):
                raise param_invalid(op, "a chosen token must be 32 to 128 hex digits")
            if self._offers.get(offer_id) is not None:
                raise fail(op, Code.LLM_REPEAT_REQUEST, f"offer id {offer_id} is live already")
        address = self._listener.address
        if address is None:
            raise fail(
                op,
                Code.LLM_FEATURE_NOT_ENABLED,
                "the offering engine must listen (listen_ip_info): fetchers link to it",
            )
        offer = Offer(
            self._offers.next_id() if offer_id is None else offer_id,
            kind,
            request_id,
            secrets.token_hex(16) if token is None else token,
            entry,
            blocks,
            layers,
            tnpl,
            lease,
            on_layer=on_layer,
        )
        offer.idle.set()
        self._offers.add(offer)
        self._arm_lease(offer)
        return Ticket(
            kind=kind,
            cluster_id=self._identity.cluster_id,
            incarnation=self._identity.incarnation,
            endpoint=_endpoint(address),
            request_id=request_id,
            offer_id=offer.offer_id,
            token=offer.token,
            cache_id=entry.cache.cache_id,
            block_ids=[int(b) for b in blocks.tolist()],
            layers=(layers.start, layers.stop) if layers is not None else None,
            tensors_per_layer=tnpl,
            block_bytes=entry.layout.unit_bytes,
            num_tensors=entry.layout.num_tensors,
            num_tokens=num_tokens,
            lease_ms=int(lease * 1000),
        )

    def _arm_lease(self, offer: Offer) -> None:
        if offer.timer is not None:
            offer.timer.cancel()
        loop = asyncio.get_running_loop()
        offer.timer = loop.call_later(offer.lease_s, self._lease_ran_out, offer.offer_id)

    def _lease_ran_out(self, offer_id: int) -> None:
        offer = self._offers.get(offer_id)
        if offer is None or offer.ended is not None:
            return
        if offer.claimer is None:
            self._offers.end(
                offer, Ended.EXPIRED, "the lease ran out before anyone claimed the offer"
            )
        elif offer.kind == "push":  # the pusher stopped making progress: take the blocks back
            self._links.spawn(self._abort_offer(offer, "the pusher made no progress in its lease"))

    async def finished(self) -> AsyncIterator[Finished]:
        """Every offer of this engine that ends, as it ends (each exactly once)."""
        async for end in self._offers.finished():
            yield end

    def poll_finished(self) -> list[Finished]:
        """The offers that ended since the last call (each exactly once)."""
        return self._offers.poll_finished()

    async def wait_finished(self, timeout_s: float | None = None) -> list[Finished]:
        """:meth:`poll_finished` once at least one offer ended, or after ``timeout_s`` (then
        possibly empty); ``None`` waits as long as it takes."""
        return await self._offers.wait_finished(timeout_s)

    def live(self) -> int:
        """Offers of this engine not ended yet."""
        return len(self._offers)

    # ------------------------------------------------------------------ serving a fetch
    async def _on_fetch(self, link: Link, msg: dict[str, Any]) -> None:
        offer = self._offers.get(msg["offer"])
        try:
            if offer is None or offer.kind != "pull" or not offer.token_ok(msg["token"]):
                raise fail("fetch", Code.LLM_KV_CACHE_NOT_EXIST, "no such live offer")
            if offer.claimer is not None:
                raise fail("fetch", Code.LLM_REPEAT_REQUEST, "the offer was fetched already")
            remote = link.registry.caches.get(msg["cache"])
            dst = _dst_blocks(offer, remote, msg["blocks"])
        except LLMException as exc:
            link.channel.ack(msg["rid"], int(exc.status_code), str(exc))
            return
        offer.claimer = link
        if offer.timer is not None:
            offer.timer.cancel()
        link.channel.ack(msg["rid"])
        assert remote is not None
        offer.task = asyncio.create_task(self._serve(offer, link, remote, dst, msg["per_layer"]))

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
                    link.channel.send("layer", offer=offer.offer_id, lo=lo, hi=hi)
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
            link.channel.send("fetched", offer=offer.offer_id, code=int(code), message=message)

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

        def plan() -> Any:
            return block_pieces(dst_bases, src_bases, dst, src, bb)

        offer.moving += 1
        offer.idle.clear()
        try:
            route = Route(link, offer.entry, [remote])
            await self._mover.transfer(
                "handoff", route, plan, write=True, nbytes_hint=dst.size * src_bases.size * bb
            )
        finally:
            offer.moving -= 1
            if offer.moving == 0:
                offer.idle.set()

    # ------------------------------------------------------------------ ending offers
    async def abort(self, ticket: TicketLike | str) -> None:
        """Cancel an offer: ours (by ticket or request id), or one we fetch from or push into.
        Returns once no copy of it is in flight and none will start; the other engine is told
        (linked to first if need be). An offer that ended already (the abort lost the race) is
        no error: nothing changes."""
        if isinstance(ticket, str):
            offer = self._offers.for_request(ticket)
            if offer is not None:
                await self._abort_offer(offer, "aborted here")
                return
        if isinstance(ticket, str) and not ticket.lstrip().startswith("{"):
            return  # a request id whose offer ended already (it lost the race): nothing to do
        t = Ticket.of(ticket)
        if (
            t.cluster_id == self._identity.cluster_id
            and t.incarnation == self._identity.incarnation
        ):
            mine = self._offers.get(t.offer_id)
            if mine is not None and mine.token_ok(t.token):
                await self._abort_offer(mine, "aborted here")
            return
        key = (t.cluster_id, t.offer_id)
        claim = self._drop_claim(key)
        if claim is not None:  # push mode: we stop pushing, then tell the offerer
            await claim.idle.wait()
        link = self._linker.live_link(t.cluster_id)
        if link is None:  # tell the offerer even if we never linked (we need nothing of it);
            # an operation of ours linking to it meanwhile: link_to waits for that setup
            with contextlib.suppress(LLMException):
                link = await self._linker.link_to("abort", t, ABORT_TIMEOUT_S)
        self._drop_claim(key)  # a push of ours that asked for it meanwhile: its answer is void
        if link is None or link.peer.incarnation != t.incarnation:
            return
        fetching = self._fetches.get(key)
        if fetching is not None and fetching.link is link:  # it writes our blocks: it must stop
            await self._fence.stop_writer(link, offer=t.offer_id, token=t.token, mine=False)
        else:  # we write theirs (push) or nothing: telling it is a courtesy
            with contextlib.suppress(LLMException):
                await link.channel.request(
                    "abort", ABORT_TIMEOUT_S, offer=t.offer_id, token=t.token, mine=False
                )

    async def _abort_offer(self, offer: Offer, why: str) -> None:
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

    async def _on_abort(self, link: Link, msg: dict[str, Any]) -> None:
        if msg["mine"]:  # the sender's offer, which we push into: stop, then confirm
            claim = self._drop_claim((link.peer.cluster_id, msg["offer"]))
            if claim is not None:
                await claim.idle.wait()
        else:  # our offer, which the sender fetches or pushes into
            offer = self._offers.get(msg["offer"])
            if offer is not None and offer.token_ok(msg["token"]):
                if offer.kind == "pull":
                    await self._abort_offer(offer, "aborted by the fetcher")
                else:  # the claimer itself aborts: it stopped pushing already
                    self._offers.end(offer, Ended.ABORTED, "aborted by the pusher")
        link.channel.ack(msg["rid"])

    def _on_link_closed(self, link: Link) -> None:
        for offer in self._offers.live_offers():
            if offer.claimer is link and offer.kind == "push":
                self._offers.end(
                    offer, Ended.FAILED, f"the pusher's link closed: {link.channel.close_reason}"
                )
        for fetch in list(self._fetches.values()):
            if fetch.link is link:
                fetch.events.put_nowait(("closed", link.channel.close_reason))
        for key, claim in list(self._claims.items()):
            if claim.link is link:
                claim.aborted = True
                del self._claims[key]

    # ------------------------------------------------------------------ renewing
    async def renew(self, ticket: TicketLike) -> None:
        """Extend a live offer's lease by its full length (a decode that is not ready yet)."""
        t = Ticket.of(ticket)
        link = await self._linker.link_to("renew", t, ABORT_TIMEOUT_S)
        ack = await link.channel.request("renew", ABORT_TIMEOUT_S, offer=t.offer_id, token=t.token)
        if ack["code"]:
            raise fail("renew", status_from_code(ack["code"]), ack["message"])
        self._stats.renewals += 1
        self._stats.count(t.cluster_id, "renewals_sent")

    async def _on_renew(self, link: Link, msg: dict[str, Any]) -> None:
        offer = self._offers.get(msg["offer"])
        if offer is None or not offer.token_ok(msg["token"]) or offer.claimer is not None:
            link.channel.ack(msg["rid"], int(Code.LLM_KV_CACHE_NOT_EXIST), "no live offer")
            return
        self._arm_lease(offer)
        self._stats.count(link.peer.cluster_id, "renewals")
        self._stats.renewals_received += 1
        link.channel.ack(msg["rid"])

    # ================================================================== fetching side
    async def fetch(
        self,
        ticket: TicketLike,
        cache: Cache,
        block_ids: Sequence[int],
        *,
        on_layer: LayerCallback | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Take the blocks a ticket offers into ``block_ids`` of ``cache`` (one per offered
        block; ``cache`` registered with ``remote_accessible=True``: the offerer writes it).
        ``on_layer(lo, hi)`` is called as layers [lo, hi) land. Links to the offerer if needed.
        Fewer ``block_ids`` than the ticket offers take the offer's *last* blocks (the fetcher
        holds the first ones already, e.g. from a local prefix cache hit).

        Raises:
            FetchError: the fetch failed, timed out or was aborted: ``partial_blocks`` may hold
                partial data. The offer ended on the offering side (it frees its blocks).
            LLMException: bad arguments (``LLM_PARAM_INVALID``), nothing moved.
        """
        op = "fetch"
        t = Ticket.of(ticket)
        if t.kind != "pull":
            raise param_invalid(op, "a push-mode ticket is pushed into (push), not fetched")
        check_cache_arg(op, "cache", cache)
        self._state.require(op)
        entry = self._resolver.local(op, cache)
        dst = block_list(op, "block_ids", list(block_ids))
        _check_destination(op, entry, dst, t, tail=True)
        deadline_s = DEFAULT_FETCH_TIMEOUT_S if timeout_s is None else float(timeout_s)
        t0 = time.perf_counter()
        partial = [int(b) for b in dst.tolist()]
        link = await self._linker.link_to(op, t, deadline_s, partial)
        async with self._fetch_slot(t, link):
            await self._run_fetch(t, link, entry, dst, on_layer, deadline_s, partial)
        elapsed = time.perf_counter() - t0
        nbytes = _ticket_bytes(t, len(partial))  # the tail it fetched, maybe not every block
        self._stats.fetches.record(nbytes, len(partial), elapsed)
        self._stats.count(t.cluster_id, "fetched")
        self._stats.count(t.cluster_id, "bytes_received", nbytes)
        self._stats.bytes_received += nbytes
        self._stats.observe(t.cluster_id, "fetch_seconds", elapsed)

    @contextlib.asynccontextmanager
    async def _fetch_slot(self, t: Ticket, link: Link) -> AsyncIterator[None]:
        """At most ``max_fetches`` fetches in flight; one that waits keeps its lease alive."""
        slots = self._slots
        if slots.full():
            renewer = asyncio.create_task(self._keep_renewing(t, link))
            try:
                await slots.acquire()
            finally:
                renewer.cancel()
        else:
            await slots.acquire()
        try:
            yield
        finally:
            slots.release()

    async def _keep_renewing(self, t: Ticket, link: Link) -> None:
        period = max(0.05, t.lease_ms / 1000 / 3)
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(LLMException):
                await link.channel.request(
                    "renew", ABORT_TIMEOUT_S, offer=t.offer_id, token=t.token
                )
                self._stats.renewals += 1
                self._stats.count(t.cluster_id, "renewals_sent")

    async def _run_fetch(
        self,
        t: Ticket,
        link: Link,
        entry: LocalCache,
        dst: np.ndarray,
        on_layer: LayerCallback | None,
        deadline_s: float,
        partial: list[int],
    ) -> None:
        key = (t.cluster_id, t.offer_id)
        fetch = Fetch(link)
        self._fetches[key] = fetch
        try:
            async with asyncio.timeout(deadline_s):
                ack = await link.channel.request(
                    "fetch",
                    deadline_s,
                    offer=t.offer_id,
                    token=t.token,
                    cache=entry.cache.cache_id,
                    blocks=partial,
                    per_layer=on_layer is not None,
                )
                if ack["code"]:
                    raise self._failed(t, status_from_code(ack["code"]), ack["message"], [])
                while True:
                    kind, value = await fetch.events.get()
                    if kind == "layer" and on_layer is not None:
                        result = on_layer(*value)
                        if inspect.isawaitable(result):
                            await result
                    elif kind == "fetched":
                        code, message = value
                        if code:
                            raise self._failed(t, status_from_code(code), message, partial)
                        return
                    elif kind == "closed":
                        # its tcp connections are revoked: wait out a write already running
                        await self._fence.wait_out_writes()
                        raise self._failed(
                            t, Code.LLM_LINK_FAILED, f"the link closed: {value}", partial
                        )
        except (TimeoutError, asyncio.CancelledError) as exc:
            # the offerer may still be writing our blocks: it must stop before we return
            await asyncio.shield(
                self._fence.stop_writer(link, offer=t.offer_id, token=t.token, mine=False)
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._failed(
                t, Code.LLM_TIMEOUT, f"no end within {deadline_s} s", partial
            ) from exc
        except LLMException as exc:
            if isinstance(exc, FetchError):
                raise
            raise self._failed(t, exc.status_code, str(exc), partial) from exc
        finally:
            self._fetches.pop(key, None)

    def _failed(self, t: Ticket, code: LLMStatusCode, why: str, partial: list[int]) -> FetchError:
        return fetch_failed(self._stats, t, code, why, partial)

    async def _on_layer(self, link: Link, msg: dict[str, Any]) -> None:
        fetch = self._fetches.get((link.peer.cluster_id, msg["offer"]))
        if fetch is not None and fetch.link is link:
            fetch.events.put_nowait(("layer", (msg["lo"], msg["hi"])))

    async def _on_fetched(self, link: Link, msg: dict[str, Any]) -> None:
        fetch = self._fetches.get((link.peer.cluster_id, msg["offer"]))
        if fetch is not None and fetch.link is link:
            fetch.events.put_nowait(("fetched", (msg["code"], msg["message"])))

    # ================================================================== push mode, pusher side
    async def push(
        self,
        ticket: TicketLike,
        cache: Cache,
        block_ids: Sequence[int],
        *,
        layers: range | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Push mode: write ``block_ids`` of ``cache`` into the destination blocks a push
        ticket offers (all its layers, or ``layers``, absolute layer numbers of the ticket's
        range, e.g. one layer as the model finishes it). Claims the offer on first use.

        Raises:
            FetchError: the offer is gone, aborted or the push failed (``partial_blocks``: the
                destination blocks that may hold partial data).
        """
        op = "push"
        t = Ticket.of(ticket)
        if t.kind != "push":
            raise param_invalid(op, "a pull-mode ticket is fetched, not pushed into")
        check_cache_arg(op, "cache", cache)
        check_isinstance("layers", layers, range)
        self._state.require(op)
        entry = self._resolver.local(op, cache)
        src = block_list(op, "block_ids", list(block_ids))
        _check_destination(op, entry, src, t)
        span = (
            range(*t.layers)
            if t.layers is not None
            else range(t.num_tensors // t.tensors_per_layer)
        )
        todo = span if layers is None else layers
        if todo.step != 1 or todo.start < span.start or todo.stop > span.stop or not todo:
            raise param_invalid(op, f"layers {layers} must lie within the ticket's {span}")
        timeout = DEFAULT_FETCH_TIMEOUT_S if timeout_s is None else float(timeout_s)
        dst_blocks = [int(b) for b in t.block_ids]
        claim = await self._claim(t, timeout, dst_blocks)
        remote = claim.link.registry.caches.get(t.cache_id)
        if remote is None or claim.aborted:
            raise self._failed(t, Code.LLM_KV_CACHE_NOT_EXIST, "the offer is gone", dst_blocks)
        tp = t.tensors_per_layer
        src_bases = entry.layout.addrs[todo.start * tp : todo.stop * tp]
        dst_bases = remote.layout.addrs[todo.start * tp : todo.stop * tp]
        dst = np.asarray(t.block_ids, dtype=np.int64)
        bb = entry.layout.unit_bytes
        claim.moving += 1
        claim.idle.clear()
        try:
            if claim.aborted:
                raise self._failed(t, Code.LLM_FAILED, "the offer was aborted", dst_blocks)
            route = Route(claim.link, entry, [remote])
            await self._mover.transfer(
                op,
                route,
                lambda: block_pieces(dst_bases, src_bases, dst, src, bb),
                write=True,
                nbytes_hint=src.size * src_bases.size * bb,
            )
        except LLMException as exc:
            if isinstance(exc, FetchError):
                raise
            raise self._failed(t, exc.status_code, str(exc), dst_blocks) from exc
        finally:
            claim.moving -= 1
            if claim.moving == 0:
                claim.idle.set()
        ack = await self._request(
            claim.link,
            "pushed",
            timeout,
            t,
            dst_blocks,
            offer=t.offer_id,
            lo=todo.start,
            hi=todo.stop,
        )
        if ack["code"]:
            raise self._failed(t, status_from_code(ack["code"]), ack["message"], dst_blocks)
        pushed = src.size * src_bases.size * bb
        self._stats.bytes_sent += pushed
        self._stats.count(t.cluster_id, "bytes_sent", pushed)

    async def complete(self, ticket: TicketLike, *, failed: str = "") -> None:
        """Push mode: every layer was pushed (or ``failed``: why not): the destination's offer
        ends done (or failed) on its engine, exactly once. Pushes of it still running are
        waited for first; none starts after."""
        t = Ticket.of(ticket)
        claim = self._claims.pop((t.cluster_id, t.offer_id), None)
        if claim is None:
            raise fail("complete", Code.LLM_KV_CACHE_NOT_EXIST, "this engine holds no such claim")
        claim.aborted = True  # no push of it starts any more ...
        await claim.idle.wait()  # ... and the offer ends only after the ones running returned
        code = Code.LLM_FAILED if failed else Code.LLM_SUCCESS
        ack = await self._request(
            claim.link,
            "complete",
            DEFAULT_FETCH_TIMEOUT_S,
            t,
            [int(b) for b in t.block_ids],
            offer=t.offer_id,
            code=int(code),
            message=failed,
        )
        if ack["code"]:
            raise self._failed(t, status_from_code(ack["code"]), ack["message"], [])

    async def _claim(self, t: Ticket, timeout: float, dst_blocks: list[int]) -> Claim:
        key = (t.cluster_id, t.offer_id)
        claim = self._claims.get(key)
        if claim is not None:
            return claim
        link = await self._linker.link_to("push", t, timeout, dst_blocks)
        pending = Claim(link, t)  # an abort while we ask marks it: the answer is void then
        asking = self._claiming.setdefault(key, [])
        asking.append(pending)
        try:
            ack = await self._request(
                link, "claim", timeout, t, dst_blocks, offer=t.offer_id, token=t.token
            )
        finally:
            asking.remove(pending)
            if not asking:
                self._claiming.pop(key, None)
        if ack["code"]:
            raise self._failed(t, status_from_code(ack["code"]), ack["message"], [])
        if pending.aborted:
            raise self._failed(t, Code.LLM_FAILED, "the offer was aborted", dst_blocks)
        claim = self._claims.get(key)  # a concurrent push may have claimed it meanwhile
        if claim is None:
            claim = self._claims[key] = pending
            claim.idle.set()
        return claim

    def _drop_claim(self, key: tuple[int, int]) -> Claim | None:
        """Our claim on an offer ends (aborted): the held one is returned (wait until it is
        idle: no push of it in flight); one still being asked for is void when answered."""
        for pending in self._claiming.get(key, ()):
            pending.aborted = True
        claim = self._claims.pop(key, None)
        if claim is not None:
            claim.aborted = True
        return claim

    async def _request(
        self, link: Link, kind: str, timeout: float, t: Ticket, partial: list[int], **fields: Any
    ) -> dict[str, Any]:
        try:
            return await link.channel.request(kind, timeout, **fields)
        except LLMException as exc:
            raise self._failed(t, exc.status_code, str(exc), partial) from exc

    # ------------------------------------------------------------------ push mode, offerer side
    async def _on_claim(self, link: Link, msg: dict[str, Any]) -> None:
        offer = self._offers.get(msg["offer"])
        if offer is None or offer.kind != "push" or not offer.token_ok(msg["token"]):
            link.channel.ack(msg["rid"], int(Code.LLM_KV_CACHE_NOT_EXIST), "no such live offer")
            return
        if offer.claimer is not None and offer.claimer is not link:
            link.channel.ack(msg["rid"], int(Code.LLM_REPEAT_REQUEST), "claimed by another engine")
            return
        offer.claimer = link
        self._arm_lease(offer)  # from now on the lease bounds the pusher's progress
        link.channel.ack(msg["rid"])

    async def _on_pushed(self, link: Link, msg: dict[str, Any]) -> None:
        offer = self._offers.get(msg["offer"])
        if offer is None or offer.claimer is not link:
            link.channel.ack(msg["rid"], int(Code.LLM_KV_CACHE_NOT_EXIST), "no such claimed offer")
            return
        self._arm_lease(offer)
        landed = (msg["hi"] - msg["lo"]) * offer.tnpl * int(offer.blocks.size)
        landed *= offer.entry.layout.unit_bytes
        self._stats.bytes_received += landed
        self._stats.count(link.peer.cluster_id, "bytes_received", landed)
        if offer.on_layer is not None:
            try:
                result = offer.on_layer(msg["lo"], msg["hi"])
                if inspect.isawaitable(result):
                    await result
            except Exception:  # the application's callback: its bug is not the peer's
                log.exception("dxl: on_layer callback of %r failed", offer.request_id)
        link.channel.ack(msg["rid"])

    async def _on_complete(self, link: Link, msg: dict[str, Any]) -> None:
        offer = self._offers.get(msg["offer"])
        if offer is None or offer.claimer is not link:
            link.channel.ack(msg["rid"], int(Code.LLM_KV_CACHE_NOT_EXIST), "no such claimed offer")
            return
        if msg["code"]:
            self._offers.end(offer, Ended.FAILED, msg["message"] or "the pusher failed")
        else:
            self._offers.end(offer, Ended.DONE)
        link.channel.ack(msg["rid"])

    # ================================================================== both sides
    def stats(self) -> dict[str, Any]:
        """Counters of this engine's handoffs, and per peer (cluster id; -1: offers nobody
        claimed). ``per_peer`` counters: ``done``/``failed``/``aborted``/``expired`` (our
        offers' ends), ``bytes_sent``/``bytes_received``, ``fetched``/``fetch_failed`` (our
        fetches), ``renewals`` (of our offers, received) and ``renewals_sent``. Histograms
        (:meth:`Histogram.snapshot`, seconds): ``fetch_seconds`` (our fetches) and
        ``done_seconds`` (our offers that ended done, from ``offer()``), per peer in
        ``per_peer_hist``. See dxl/handoff/metrics.py for Prometheus."""
        return self._stats.snapshot(
            offers_live=len(self._offers),
            live_by_peer=self._offers.live_by_peer(),
            fetches_in_flight=len(self._fetches),
            claims=len(self._claims),
            max_fetches=self.max_fetches,
        )

    async def close(self) -> None:
        """Engine shutdown: every live offer ends (aborted), every fetch fails."""
        for offer in self._offers.live_offers():
            offer.aborting = True
            if offer.task is not None:
                await asyncio.gather(offer.task, return_exceptions=True)
            self._offers.end(offer, Ended.ABORTED, "the engine closed")
        for fetch in list(self._fetches.values()):
            fetch.events.put_nowait(("closed", "the engine closed"))


# ---------------------------------------------------------------------- helpers
def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def _endpoint(address: tuple[str, int]) -> str:
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _layer_tensors(op: str, entry: LocalCache, layers: range | None, tnpl: int) -> None:
    n = entry.layout.num_tensors
    if tnpl < 1 or n % tnpl:
        raise param_invalid(op, f"the cache's {n} tensors are not whole layers of {tnpl}")
    if layers is not None and (
        layers.step != 1 or not 0 <= layers.start < layers.stop or layers.stop * tnpl > n
    ):
        raise param_invalid(op, f"layers {layers} must lie within the cache's {n // tnpl} layers")


def _check_destination(
    op: str, entry: LocalCache, blocks: np.ndarray, t: Ticket, *, tail: bool = False
) -> None:
    """Our side of a handoff must match the ticket: one block per offered block (``tail``: per
    offered block of the last ones, at least one), same block size, enough tensors for the
    layers."""
    if tail and 0 < blocks.size < len(t.block_ids):
        pass
    elif blocks.size != len(t.block_ids):
        raise param_invalid(
            op, f"block_ids must name {len(t.block_ids)} blocks (one per offered block)"
        )
    check_blocks_in_range(op, "block_ids", blocks, entry.layout.units)
    if entry.layout.unit_bytes != t.block_bytes:
        raise param_invalid(
            op, f"block sizes differ: here {entry.layout.unit_bytes}, offered {t.block_bytes}"
        )
    stop = t.layers[1] if t.layers is not None else t.num_tensors // t.tensors_per_layer
    if entry.layout.num_tensors < stop * t.tensors_per_layer:
        raise param_invalid(op, f"the cache has fewer tensors than the offer's layers (to {stop})")


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


def _ticket_bytes(t: Ticket, blocks: int) -> int:
    layers = (
        (t.layers[1] - t.layers[0])
        if t.layers is not None
        else t.num_tensors // t.tensors_per_layer
    )
    return layers * t.tensors_per_layer * blocks * t.block_bytes
