"""The pushing side of push mode: this engine claims another engine's destination offer, writes
layers into it as they are ready (each push tells the offerer which layers landed), and
completes it. A claim that ends (completed, aborted, its link closed) lets no push of it start
any more, and whoever ends it waits for the pushes still running."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._validate import block_list, check_cache_arg, check_isinstance
from ..control import messages as m
from ..errors import LLMException, LLMStatusCode, fail, param_invalid, status_from_code
from ..types import Cache
from .checks import check_destination, offer_view
from .counters import HandoffStats, fetch_failed
from .linking import TicketLinker, check_token
from .port import Blocks, EnginePort, Link
from .state import Claim, OfferKey, TicketLike
from .ticket import FetchError, Ticket

Code = LLMStatusCode


class Pushing:
    """Claims of this engine on other engines' push-mode offers, and the pushes into them."""

    def __init__(
        self,
        engine: EnginePort,
        linker: TicketLinker,
        stats: HandoffStats,
        timeout_s: float,
    ) -> None:
        self._engine = engine
        self._timeout_s = timeout_s  # when push()/complete() name none (dxl.HandoffFetchTimeoutS)
        self._linker = linker
        self._stats = stats
        self._claims: dict[OfferKey, Claim] = {}
        self._claiming: dict[OfferKey, list[Claim]] = {}  # asked for, not answered

    def __len__(self) -> int:
        return len(self._claims)

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
        check_token(op, t)
        if t.kind != "push":
            raise param_invalid(op, "a pull-mode ticket is fetched, not pushed into")
        check_cache_arg(op, "cache", cache)
        check_isinstance("layers", layers, range)
        self._engine.require_running(op)
        entry = self._engine.local_cache(op, cache)
        src = block_list(op, "block_ids", list(block_ids))
        check_destination(op, entry, src, t)
        span = (
            range(*t.layers)
            if t.layers is not None
            else range(t.num_tensors // t.tensors_per_layer)
        )
        todo = span if layers is None else layers
        if todo.step != 1 or todo.start < span.start or todo.stop > span.stop or not todo:
            raise param_invalid(op, f"layers {layers} must lie within the ticket's {span}")
        timeout = self._timeout_s if timeout_s is None else float(timeout_s)
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
            pieces = Blocks(dst_bases, src_bases, dst, src, bb)
            await self._engine.transfer(op, claim.link, entry, remote, pieces, write=True)
        except LLMException as exc:
            if isinstance(exc, FetchError):
                raise
            raise self._failed(t, exc.status_code, str(exc), dst_blocks) from exc
        finally:
            claim.moving -= 1
            if claim.moving == 0:
                claim.idle.set()
        pushed_msg = m.Pushed(offer=t.offer_id, lo=todo.start, hi=todo.stop)
        ack = await self._request(claim.link, pushed_msg, timeout, t, dst_blocks)
        if ack.code:
            raise self._failed(t, status_from_code(ack.code), ack.message, dst_blocks)
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
        complete_msg = m.Complete(offer=t.offer_id, code=int(code), message=m.clip(failed))
        ack = await self._request(
            claim.link, complete_msg, self._timeout_s, t, [int(b) for b in t.block_ids]
        )
        if ack.code:
            raise self._failed(t, status_from_code(ack.code), ack.message, [])

    async def _claim(self, t: Ticket, timeout: float, dst_blocks: list[int]) -> Claim:
        key = (t.cluster_id, t.offer_id)
        claim = self._claims.get(key)
        if claim is not None:
            if _claimed_as(claim.ticket) != _claimed_as(t):  # the offerer checked that one only
                raise param_invalid(
                    "push", "the ticket differs from the one this offer was claimed with"
                )
            return claim
        link = await self._linker.link_to("push", t, timeout, dst_blocks)
        pending = Claim(link, t)  # an abort while we ask marks it: the answer is void then
        asking = self._claiming.setdefault(key, [])
        asking.append(pending)
        try:
            claim_msg = m.Claim(
                offer=t.offer_id,
                token=t.token,
                cache=t.cache_id,
                blocks=dst_blocks,
                **offer_view(t),
            )
            ack = await self._request(link, claim_msg, timeout, t, dst_blocks)
        finally:
            asking.remove(pending)
            if not asking:
                self._claiming.pop(key, None)
        if ack.code:
            raise self._failed(t, status_from_code(ack.code), ack.message, [])
        if pending.aborted:
            raise self._failed(t, Code.LLM_FAILED, "the offer was aborted", dst_blocks)
        claim = self._claims.get(key)  # a concurrent push may have claimed it meanwhile
        if claim is None:
            claim = self._claims[key] = pending
            claim.idle.set()
        return claim

    def drop_claim(self, key: OfferKey) -> Claim | None:
        """Our claim on an offer ends (aborted): the held one is returned (wait until it is
        idle: no push of it in flight); one still being asked for is void when answered."""
        for pending in self._claiming.get(key, ()):
            pending.aborted = True
        claim = self._claims.pop(key, None)
        if claim is not None:
            claim.aborted = True
        return claim

    async def stop_pushing(self, key: OfferKey) -> None:
        """Stop pushing into another engine's offer: our claim on it ends (aborted), and this
        returns once no push of it is in flight."""
        claim = self.drop_claim(key)
        if claim is not None:
            await claim.idle.wait()

    def link_closed(self, link: Link) -> None:
        """Claims on offers of the engine at the other end of ``link`` end (no push starts)."""
        for key, claim in list(self._claims.items()):
            if claim.link is link:
                claim.aborted = True
                del self._claims[key]

    async def _request(
        self, link: Link, msg: m.Request, timeout: float, t: Ticket, partial: list[int]
    ) -> m.Ack:
        try:
            return await link.channel.request(msg, timeout)
        except LLMException as exc:
            raise self._failed(t, exc.status_code, str(exc), partial) from exc

    def _failed(self, t: Ticket, code: LLMStatusCode, why: str, partial: list[int]) -> FetchError:
        return fetch_failed(self._stats, t, code, why, partial)


def _claimed_as(t: Ticket) -> tuple[object, ...]:
    """What the offerer checked of a ticket when we claimed its offer: a later push of the
    same offer must write exactly that."""
    return (t.token, t.cache_id, t.block_ids, t.layers, t.tensors_per_layer, t.block_bytes,
            t.num_tensors)  # fmt: skip
