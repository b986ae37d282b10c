"""Making offers: checking an offer's arguments, recording it in the offer table under a lease,
and handing out its ticket (pull mode: our blocks are the source; push mode: the destination).
What happens to an offer afterwards is the serving, destination, lease and abort components'."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from .._validate import block_list, check_blocks_in_range, check_cache_arg, check_isinstance
from ..errors import LLMStatusCode, fail, param_invalid
from ..types import Cache
from .defaults import CALLER_OFFER_IDS, MAX_HANDOFF_SECONDS
from .leases import Leases
from .port import EnginePort, LocalCache
from .state import LayerCallback, Offer, OfferTable
from .ticket import Ticket, format_endpoint

Code = LLMStatusCode


class Offering:
    """Checks and records new offers of this engine, and makes their tickets."""

    def __init__(
        self,
        engine: EnginePort,
        offers: OfferTable,
        leases: Leases,
        lease_s: float,
    ) -> None:
        self._engine = engine
        self._lease_s = lease_s  # when offer() names none (dxl.HandoffLeaseS)
        self._offers = offers
        self._leases = leases

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
        lease (``lease_s``, default the engine's ``dxl.HandoffLeaseS``, 30 s; renewable) ran
        out; returns the ticket for the router.

        The blocks must stay untouched until :meth:`~dxl.handoff.Handoff.finished` reports the
        offer ended.

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
        lease = self._lease_s if lease_s is None else float(lease_s)
        if not 0 < lease <= MAX_HANDOFF_SECONDS:
            raise param_invalid(
                op, f"lease_s must be in (0, {MAX_HANDOFF_SECONDS:g}], got {lease_s}"
            )
        self._engine.require_running(op)
        entry = self._engine.local_cache(op, cache)
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
        address = self._engine.listen_address
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
        self._leases.arm(offer)
        return Ticket(
            kind=kind,
            cluster_id=self._engine.cluster_id,
            incarnation=self._engine.incarnation,
            endpoint=format_endpoint(address),
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


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def _layer_tensors(op: str, entry: LocalCache, layers: range | None, tnpl: int) -> None:
    n = entry.layout.num_tensors
    if tnpl < 1 or n % tnpl:
        raise param_invalid(op, f"the cache's {n} tensors are not whole layers of {tnpl}")
    if layers is not None and (
        layers.step != 1 or not 0 <= layers.start < layers.stop or layers.stop * tnpl > n
    ):
        raise param_invalid(op, f"layers {layers} must lie within the cache's {n // tnpl} layers")
