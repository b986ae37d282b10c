"""The scheduler side of the dxl connector, without vLLM: what to offer, hand over, load, drop.

**Prefill** (a request whose ``kv_transfer_params`` say ``do_remote_decode``): in the step that
computes the rest of its prompt, the scheduler picks the handoff identity (offer id and token)
and tells its workers to offer the prompt's blocks after the forward. ``request_finished``
comes in the same step, before the workers' output reaches the scheduler, so it builds the
tickets itself (:func:`ticket_for`, from the workers' handshake data), returns ``(True,
params)`` and tells the workers the offer was *handed over*: the blocks stay held until the
offer ends (fetched, failed, aborted or expired) and a worker reports ``finished_sending``. A
request that ends otherwise (aborted, preempted, no blocks) is *dropped*: its offer is aborted
and never reported (vLLM freed the blocks at once; nobody ever got the ticket).

**Decode** (``do_remote_prefill`` and dxl tickets in the params): the tickets are checked first
(:mod:`.params`: well formed, their blocks hold exactly the tokens they claim, and they are bound
to this request's own prompt by its digest); a claim that fails any check is a *failed load*
(one block is claimed so that vLLM parks the request, and its load is reported failed at once:
``kv_load_failure_policy`` decides), never an exception and never a claim of tokens the tickets
do not verifiably hold. A good claim loads the prompt's tokens beyond the local prefix-cache
hit, asynchronously; ``update_state_after_alloc`` records the
new blocks to fetch into (the offer's last blocks, as NIXL does). A full local hit, or a
request aborted before it was scheduled, *releases* the offer (the workers abort it at the
prefill), so the prefill's blocks do not wait for the lease. A request aborted while loading
*cancels* its fetch; the worker still reports it in ``finished_recving`` (vLLM frees its blocks
then).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...guard import RateLimitedLog
from ...handoff.handoff import CALLER_OFFER_IDS
from ...handoff.ticket import Ticket
from . import timing
from .config import DxlConnectorConfig
from .params import PARAMS_KEY, Claim, Role, check_claim, prompt_digest, role_of

log = logging.getLogger("dxl.vllm")

__all__ = [
    "PARAMS_KEY",
    "HandshakeData",
    "Load",
    "OfferPlan",
    "RequestLike",
    "SchedulerSide",
    "StepPlan",
    "ticket_for",
]

FINISHED_OK = ("FINISHED_LENGTH_CAPPED", "FINISHED_STOPPED")


class RequestLike(Protocol):
    """The part of ``vllm.v1.request.Request`` the scheduler side reads."""

    request_id: str
    kv_transfer_params: dict[str, Any] | None
    num_computed_tokens: int
    prompt_token_ids: list[int] | None

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def status(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class HandshakeData:
    """What a worker tells its scheduler once its KV caches are registered (one per rank)."""

    cluster_id: int
    incarnation: str
    endpoint: str
    cache_id: int
    block_bytes: int
    num_tensors: int
    tensors_per_layer: int

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}

    @classmethod
    def of(cls, data: HandshakeData | Mapping[str, Any]) -> HandshakeData:
        if isinstance(data, HandshakeData):
            return data
        return cls(**{f: data[f] for f in cls.__slots__})


@dataclass(frozen=True, slots=True)
class OfferPlan:
    """An offer the workers make after this step's forward, under this identity."""

    request_id: str
    offer_id: int
    token: str
    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Load:
    """A fetch for a decode request: the prefill's tickets (one per rank) into ``block_ids``
    (the offer's last ``len(block_ids)`` blocks)."""

    request_id: str
    tickets: tuple[dict[str, Any], ...]
    block_ids: tuple[int, ...]
    refused: str = ""  # not loadable (why): reported as a failed load at once


@dataclass(slots=True)
class StepPlan:
    """The connector metadata of one step, scheduler to workers (plain data: it is pickled)."""

    offers: list[OfferPlan] = field(default_factory=list)
    handed: list[int] = field(default_factory=list)  # offer ids vLLM now holds for the decode
    dropped: list[int] = field(default_factory=list)  # offer ids to abort and never report
    loads: list[Load] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)  # decode requests aborted mid-load
    releases: list[tuple[dict[str, Any], ...]] = field(default_factory=list)  # tickets to abort
    # loaded requests in their first step, for the workers' timing stamps (only with them on)
    timed: list[str] = field(default_factory=list)
    idle: bool = False  # no tokens scheduled: the step runs no forward

    def empty(self) -> bool:
        return not (
            self.offers
            or self.handed
            or self.dropped
            or self.loads
            or self.cancels
            or self.releases
        )


def ticket_for(
    hs: HandshakeData,
    plan: OfferPlan,
    lease_s: float,
    tensors_per_layer: int | None = None,
    digest: str | None = None,
) -> Ticket:
    """The ticket the worker described by ``hs`` will hand out for ``plan`` (what
    ``Handoff.offer`` returns with the same identity), bound to the prompt by ``digest``."""
    return Ticket(
        kind="pull",
        cluster_id=hs.cluster_id,
        incarnation=hs.incarnation,
        endpoint=hs.endpoint,
        request_id=plan.request_id,
        offer_id=plan.offer_id,
        token=plan.token,
        cache_id=hs.cache_id,
        block_ids=list(plan.block_ids),
        layers=None,
        tensors_per_layer=tensors_per_layer or hs.tensors_per_layer,
        block_bytes=hs.block_bytes,
        num_tensors=hs.num_tensors,
        num_tokens=plan.num_tokens,
        lease_ms=int(float(lease_s) * 1000),
        prompt_digest=digest,
    )


def new_identity() -> tuple[int, str]:
    """A random offer id in the caller's range, and a random token."""
    return CALLER_OFFER_IDS + secrets.randbelow((1 << 63) - CALLER_OFFER_IDS), secrets.token_hex(16)


class SchedulerSide:
    """The scheduler side's state (one per vLLM scheduler); see the module docstring."""

    def __init__(self, config: DxlConnectorConfig, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self.ranks: dict[int, HandshakeData] = {}
        self._producing: dict[str, RequestLike] = {}  # prefill requests not offered yet
        self._offered: dict[str, OfferPlan] = {}  # offered, not yet handed over or dropped
        self._loading: set[str] = set()  # decode requests whose fetch the workers run
        # decode requests' checked claims, from the first look until allocated or finished
        # (vLLM asks for the matched tokens again each step a request waits for blocks)
        self._claims: dict[str, Claim] = {}
        self._warn = RateLimitedLog(log)  # a client can trigger these warnings at will
        self._plan = StepPlan()
        # timing stamps on: loaded requests not scheduled since (bounded by the requests
        # vLLM holds: each leaves at its first step or when it finishes)
        self._noticed: set[str] = set()

    # ------------------------------------------------------------------ handshake
    def set_handshake(self, per_rank: Mapping[int, HandshakeData | Mapping[str, Any]]) -> None:
        self.ranks = {int(r): HandshakeData.of(d) for r, d in sorted(per_rank.items())}

    # ------------------------------------------------------------------ decode side
    def num_new_matched_tokens(
        self, request: RequestLike, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """``get_num_new_matched_tokens``: the prompt tokens past the local hit that the
        request's tickets verifiably hold; for tickets that fail a check, one block (so that
        vLLM parks the request and its load fails: ``kv_load_failure_policy`` applies)."""
        if role_of(request.kv_transfer_params).role not in (Role.LOAD, Role.BAD_LOAD):
            return 0, False
        claim = self._claim(request)
        if claim.refused:
            count = min(self.block_size, request.num_prompt_tokens - num_computed_tokens)
        else:
            count = claim.num_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def after_alloc(
        self,
        request: RequestLike,
        unhashed_block_ids: Callable[[], Sequence[int]],
        num_external_tokens: int,
        hit_blocks: int | None = None,
    ) -> None:
        """``update_state_after_alloc``: ``unhashed_block_ids()`` the request's new blocks,
        ``hit_blocks`` how many blocks its local prefix-cache hit holds (vLLM sets
        ``num_computed_tokens`` only later; None: read it from there)."""
        req_id = request.request_id
        params = request.kv_transfer_params
        seen = role_of(params)
        if seen.role is Role.NONE:
            if seen.why:
                self._warn.warning("params", "dxl: request %s: ignored: %s", req_id, seen.why)
            return
        if seen.role is Role.PRODUCE:
            self._producing[req_id] = request
            return
        assert isinstance(params, dict)  # role_of: a load's params are a dict
        claim = self._claims.pop(req_id, None) or self._check(request)
        params["do_remote_prefill"] = False  # one transfer per request
        if "do_remote_decode" in params:  # and never an offer of it later
            params["do_remote_decode"] = False
        if num_external_tokens <= 0:  # a full local prefix hit: the prefill need not wait
            if claim.refused:
                self._warn.warning("ticket", "dxl: request %s: %s", req_id, claim.refused)
            else:
                self._plan.releases.append(claim.tickets)
            return
        new = tuple(int(b) for b in unhashed_block_ids())
        why, release = claim.refused, False
        if not why:
            if hit_blocks is None:
                hit_blocks = request.num_computed_tokens // self.block_size
            need = claim.num_blocks - hit_blocks
            expect = claim.num_tokens - hit_blocks * self.block_size
            if need > 0 and len(new) == need and num_external_tokens == expect:
                self._plan.loads.append(Load(req_id, claim.tickets, new))
                self._loading.add(req_id)
                timing.stamp("load-planned", req_id, blocks=len(new))
                return
            # the request is parked for a load already: it must end as a failed one, and
            # the prefill need not wait for its lease (the tickets are this prompt's)
            why = (
                f"{len(new)} new blocks for {num_external_tokens} tokens, but the offer's "
                f"{claim.num_blocks} blocks past a {hit_blocks}-block local hit hold {expect}"
            )
            release = True
        # never released otherwise: a ticket bound to another prompt is someone else's handoff
        self._warn.warning("ticket", "dxl: request %s: failed load: %s", req_id, why)
        if release:
            self._plan.releases.append(claim.tickets)
        self._plan.loads.append(Load(req_id, (), new, why))
        self._loading.add(req_id)

    def _claim(self, request: RequestLike) -> Claim:
        claim = self._claims.get(request.request_id)
        if claim is None:
            t0 = time.perf_counter()
            claim = self._claims[request.request_id] = self._check(request)
            timing.stamp("ticket-checked", request.request_id, s=f"{time.perf_counter() - t0:.6f}")
        return claim

    def _check(self, request: RequestLike) -> Claim:
        seen = role_of(request.kv_transfer_params)
        if seen.role is Role.BAD_LOAD:
            return Claim(refused=seen.why)
        try:
            return check_claim(
                request.kv_transfer_params or {},
                request.prompt_token_ids,
                request.num_prompt_tokens,
                self.block_size,
                len(self.ranks) or None,
            )
        except Exception as exc:  # a bug here must fail one load, not the scheduler
            self._warn.warning(
                "ticket", "dxl: request %s: checking its tickets: %r", request.request_id, exc
            )
            return Claim(refused=f"the tickets could not be checked ({type(exc).__name__})")

    # ------------------------------------------------------------------ each step
    def build_plan(
        self,
        num_scheduled_tokens: Mapping[str, int],
        preempted: Iterable[str],
        block_ids_of: Callable[[str], Sequence[int]],
    ) -> StepPlan:
        """This step's metadata; resets the per-step state."""
        for req_id in preempted:
            plan = self._offered.pop(req_id, None)
            if plan is not None:  # its blocks are gone: the offer must go too
                self._plan.dropped.append(plan.offer_id)
        for req_id, request in list(self._producing.items()):
            n = num_scheduled_tokens.get(req_id, 0)
            if not n or req_id in self._offered:
                continue
            if request.num_computed_tokens + n < request.num_prompt_tokens:
                continue  # more prompt chunks to come
            prompt = request.num_prompt_tokens
            blocks = tuple(int(b) for b in block_ids_of(req_id))[: _ceil(prompt, self.block_size)]
            if not blocks or len(blocks) != _ceil(prompt, self.block_size):
                continue  # its ticket could not hold the prompt: the decode would refuse it
            offer_id, token = new_identity()
            plan = OfferPlan(req_id, offer_id, token, blocks, prompt)
            self._offered[req_id] = plan
            self._plan.offers.append(plan)
            timing.stamp("prefill-scheduled", req_id)
        if self._noticed:
            for req_id in [r for r in self._noticed if num_scheduled_tokens.get(r)]:
                self._noticed.discard(req_id)
                self._plan.timed.append(req_id)
                timing.stamp("decode-scheduled", req_id)
        out, self._plan = self._plan, StepPlan()
        out.idle = not any(num_scheduled_tokens.values())
        return out

    def request_finished(
        self, request: RequestLike, block_ids: Sequence[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._producing.pop(req_id, None)
        self._noticed.discard(req_id)
        plan = self._offered.pop(req_id, None)
        claim = self._claims.pop(req_id, None)
        params = request.kv_transfer_params
        if role_of(params).role in (Role.LOAD, Role.BAD_LOAD):
            # a decode request that ends before it was ever scheduled: free the prefill's
            # blocks, if the tickets are this prompt's (else they are someone else's handoff)
            assert isinstance(params, dict)
            params["do_remote_prefill"] = False
            claim = claim or self._check(request)
            if not claim.refused:
                self._plan.releases.append(claim.tickets)
            return False, None
        if req_id in self._loading:  # aborted while its fetch runs: stop it (still reported)
            self._plan.cancels.append(req_id)
            return False, None
        if plan is None:
            return False, None
        status = getattr(request.status, "name", str(request.status))
        blocks = tuple(int(b) for b in block_ids)
        ok = status in FINISHED_OK and blocks[: len(plan.block_ids)] == plan.block_ids
        if ok and len(self.ranks) == 0:
            log.error("dxl: no worker handshake data yet: request %s is not handed off", req_id)
            ok = False
        digest = prompt_digest(request.prompt_token_ids, plan.num_tokens, self.block_size)
        if ok and digest is None:  # a ticket that binds no prompt would be refused anyway
            self._warn.warning(
                "prompt", "dxl: request %s: no prompt token ids to bind its tickets to", req_id
            )
            ok = False
        if not ok:
            self._plan.dropped.append(plan.offer_id)
            return False, None
        out = [
            ticket_for(hs, plan, self.config.lease_s, digest=digest).to_dict()
            for hs in self.ranks.values()
        ]
        self._plan.handed.append(plan.offer_id)
        timing.stamp("tickets-built", req_id)
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_num_tokens": plan.num_tokens,
            PARAMS_KEY: out,
        }

    def finished_recving(self, req_ids: Iterable[str]) -> None:
        """The workers' ``finished_recving`` of a step (from ``update_connector_output``)."""
        if timing.enabled():
            req_ids = list(req_ids)
            for req_id in req_ids:
                if req_id in self._loading:
                    timing.stamp("load-noticed", req_id)
                    self._noticed.add(req_id)
        self._loading.difference_update(req_ids)

    def pending(self) -> dict[str, int]:
        """Counts for tests and stats."""
        return {
            "producing": len(self._producing),
            "offered": len(self._offered),
            "loading": len(self._loading),
            "claims": len(self._claims),
        }


def _ceil(a: int, b: int) -> int:
    return -(-a // b)
