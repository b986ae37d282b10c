"""The fetching side of pull mode: a fetch of ours asks the offerer for its offer, then waits
while the offerer writes our blocks (whole, or layer by layer with a callback per layer) and
tells us how it ended. At most ``max_fetches`` run at once; one waiting for a slot keeps the
offer's lease alive. A fetch that gives up (timeout, cancellation) returns only once the offerer
no longer writes our blocks. Renewing the lease of an offer whose ticket we hold (a decode that
is not ready yet) is the ticket holder's too, so it is here."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Sequence

from .._validate import block_list, check_cache_arg
from ..control import messages as m
from ..errors import LLMException, LLMStatusCode, fail, param_invalid, status_from_code
from ..types import Cache
from .checks import check_destination, offer_view
from .counters import HandoffStats, fetch_failed
from .defaults import ABORT_TIMEOUT_S
from .fence import WriterFence
from .linking import TicketLinker, check_token
from .port import EnginePort, Link, LocalCache
from .slots import Slots
from .state import Fetch, LayerCallback, OfferKey, TicketLike
from .ticket import FetchError, Ticket

Code = LLMStatusCode


class Fetching:
    """Fetches of this engine, in flight by (offerer's cluster id, offer id)."""

    def __init__(
        self,
        engine: EnginePort,
        linker: TicketLinker,
        fence: WriterFence,
        slots: Slots,
        stats: HandoffStats,
        timeout_s: float,
    ) -> None:
        self._engine = engine
        self._timeout_s = timeout_s  # when fetch() names none (dxl.HandoffFetchTimeoutS)
        self._linker = linker
        self._fence = fence
        self._slots = slots
        self._stats = stats
        self._fetches: dict[OfferKey, Fetch] = {}

    def __len__(self) -> int:
        return len(self._fetches)

    def in_flight(self, key: OfferKey) -> Fetch | None:
        """Our fetch of another engine's offer, while it runs."""
        return self._fetches.get(key)

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
        check_token(op, t)
        if t.kind != "pull":
            raise param_invalid(op, "a push-mode ticket is pushed into (push), not fetched")
        check_cache_arg(op, "cache", cache)
        self._engine.require_running(op)
        entry = self._engine.local_cache(op, cache)
        dst = block_list(op, "block_ids", list(block_ids))
        check_destination(op, entry, dst, t, tail=True)
        deadline_s = self._timeout_s if timeout_s is None else float(timeout_s)
        t0 = time.perf_counter()
        partial = [int(b) for b in dst.tolist()]
        link = await self._linker.link_to(op, t, deadline_s, partial)
        async with self._fetch_slot(t, link):
            await self._run_fetch(t, link, entry, on_layer, deadline_s, partial)
        elapsed = time.perf_counter() - t0
        nbytes = _ticket_bytes(t, len(partial))  # the tail it fetched, maybe not every block
        self._stats.fetches.record(nbytes, len(partial), elapsed)
        self._stats.count(t.cluster_id, "fetched")
        self._stats.count(t.cluster_id, "bytes_received", nbytes)
        self._stats.bytes_received += nbytes
        self._stats.observe(t.cluster_id, "fetch_seconds", elapsed)

    async def renew(self, ticket: TicketLike) -> None:
        """Extend a live offer's lease by its full length (a decode that is not ready yet)."""
        t = Ticket.of(ticket)
        link = await self._linker.link_to("renew", t, ABORT_TIMEOUT_S)
        ack = await link.channel.request(m.Renew(offer=t.offer_id, token=t.token), ABORT_TIMEOUT_S)
        if ack.code:
            raise fail("renew", status_from_code(ack.code), ack.message)
        self._stats.renewals += 1
        self._stats.count(t.cluster_id, "renewals_sent")

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
                    m.Renew(offer=t.offer_id, token=t.token), ABORT_TIMEOUT_S
                )
                self._stats.renewals += 1
                self._stats.count(t.cluster_id, "renewals_sent")

    async def _run_fetch(
        self,
        t: Ticket,
        link: Link,
        entry: LocalCache,
        on_layer: LayerCallback | None,
        deadline_s: float,
        partial: list[int],
    ) -> None:
        key = (t.cluster_id, t.offer_id)
        fetch = Fetch(link)
        self._fetches[key] = fetch
        try:
            async with asyncio.timeout(deadline_s):
                fetch_msg = m.Fetch(
                    offer=t.offer_id,
                    token=t.token,
                    cache=entry.cache.cache_id,
                    blocks=partial,
                    per_layer=on_layer is not None,
                    src_cache=t.cache_id,
                    offered=len(t.block_ids),
                    **offer_view(t),
                )
                ack = await link.channel.request(fetch_msg, deadline_s)
                if ack.code:
                    raise self._failed(t, status_from_code(ack.code), ack.message, [])
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

    # ------------------------------------------------------------------ the offerer's messages
    async def on_layer(self, link: Link, msg: m.Layer) -> None:
        """Layers [lo, hi) of a fetch of ours landed."""
        fetch = self._fetches.get((link.peer.cluster_id, msg.offer))
        if fetch is not None and fetch.link is link:
            fetch.events.put_nowait(("layer", (msg.lo, msg.hi)))

    async def on_fetched(self, link: Link, msg: m.Fetched) -> None:
        """The offerer's copy for a fetch of ours ended (the code says how)."""
        fetch = self._fetches.get((link.peer.cluster_id, msg.offer))
        if fetch is not None and fetch.link is link:
            fetch.events.put_nowait(("fetched", (msg.code, msg.message)))

    def link_closed(self, link: Link) -> None:
        """Fetches from the engine at the other end of ``link`` fail."""
        for fetch in list(self._fetches.values()):
            if fetch.link is link:
                fetch.events.put_nowait(("closed", link.channel.close_reason))

    def close(self) -> None:
        """Engine shutdown: every fetch fails."""
        for fetch in list(self._fetches.values()):
            fetch.events.put_nowait(("closed", "the engine closed"))


def _ticket_bytes(t: Ticket, blocks: int) -> int:
    layers = (
        (t.layers[1] - t.layers[0])
        if t.layers is not None
        else t.num_tensors // t.tensors_per_layer
    )
    return layers * t.tensors_per_layer * blocks * t.block_bytes
