"""What a handoff peer or a ticket cannot do (issue 19, items 3, 4, 9, 10).

Two engines in this process, linked over loopback (tcp). The attacker is either a ticket edited
on its way through the router (the engine that uses it is honest), or the linked peer itself,
which writes frames of its choice on the link's control connection (``inject``): the schema
and field checks of the receiving engine are what stand between those frames and its handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

import dxl
from dxl.control import wire
from dxl.handoff import Ended, Ticket
from dxl.testing import KVBuffers

S = dxl.LLMStatusCode
P_ID, D_ID = 31, 32
TENSORS, BLOCKS, BB = 4, 16, 4096
P_SEED, D_SEED = 5, 9
RID = 1 << 40  # above any request id the engines' own channels use here


@dataclass
class Pair:
    prefill: dxl.Engine
    decode: dxl.Engine
    pkv: KVBuffers
    dkv: KVBuffers
    pcache: dxl.Cache
    dcache: dxl.Cache

    def link(self, eng: dxl.Engine, peer: int) -> Any:
        link = eng._links.get(peer)
        assert link is not None, f"no live link to {peer}"
        return link


@contextlib.asynccontextmanager
async def pair() -> AsyncIterator[Pair]:
    """A prefill and a decode engine, both listening, each with a remotely accessible cache."""
    pkv = KVBuffers(TENSORS, BLOCKS, BB, seed=P_SEED)
    dkv = KVBuffers(TENSORS, BLOCKS, BB, seed=D_SEED)
    opts = {"llm.listenIpInfo": "127.0.0.1:0"}
    async with (
        dxl.Engine(P_ID, dxl.LLMRole.PROMPT, dict(opts)) as prefill,
        dxl.Engine(D_ID, dxl.LLMRole.DECODER, dict(opts)) as decode,
    ):
        pcache = await prefill.register_blocks_cache(
            pkv.desc(), pkv.addrs, dxl.BlocksCacheKey(P_ID, 0), remote_accessible=True
        )
        dcache = await decode.register_blocks_cache(dkv.desc(), dkv.addrs, remote_accessible=True)
        yield Pair(prefill, decode, pkv, dkv, pcache, dcache)


async def linked(p: Pair) -> None:
    """The decode links to the prefill the way a fetch does (one good fetch)."""
    ticket = await p.prefill.handoff.offer("warmup", p.pcache, [15])
    await p.decode.handoff.fetch(ticket, p.dcache, [15])


async def inject(link: Any, kind: str, **fields: Any) -> Any:
    """Send a frame of our choice (no schema check on this side) on ``link`` as a request, and
    return the peer's ack; no ack within 5 s fails the test."""
    channel = link.channel
    fut = asyncio.get_running_loop().create_future()
    channel._waiters[RID] = fut
    body = json.dumps({"t": kind, "rid": RID, **fields}).encode()
    channel._writer.write(wire.HEADER.pack(len(body)) + body)
    try:
        async with asyncio.timeout(5):
            return await fut
    except TimeoutError:
        raise AssertionError(f"no answer to the {kind} within 5 s") from None
    finally:
        channel._waiters.pop(RID, None)


def code_of(ack: Any) -> int:
    return ack["code"] if isinstance(ack, dict) else ack.code


ROWS = range(TENSORS)


# ====================================================================== item 4: malformed fields
async def test_a_malformed_token_fails_that_fetch_only() -> None:
    """A fetch whose token is valid JSON but no text ("\\ud800") is refused with an error ack;
    the link, the offer and the fetches on that link are untouched."""
    async with pair() as p:
        await linked(p)
        ticket = await p.prefill.handoff.offer("r", p.pcache, [1, 2])
        link = p.link(p.decode, P_ID)
        ack = await inject(
            link,
            "fetch",
            offer=ticket.offer_id,
            token="\ud800",
            cache=p.dcache.cache_id,
            blocks=[3, 4],
            per_layer=False,
        )
        assert code_of(ack) == int(S.LLM_PARAM_INVALID)
        assert not link.closed and p.link(p.prefill, D_ID) is not None
        assert p.prefill.handoff.live() == 1  # the offer waits for its real fetcher
        await p.decode.handoff.fetch(ticket, p.dcache, [3, 4])
        assert p.dkv.matches(ROWS, [3, 4], P_SEED, ROWS, [1, 2])
        assert p.link(p.decode, P_ID) is link


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("renew", {"offer": 1, "token": "\udfff"}),
        ("abort", {"offer": 1, "token": "x" * 5000, "mine": False}),
        ("complete", {"offer": 1, "code": 0, "message": "m" * 5000}),
        ("claim", {"offer": 1, "token": "not hex!"}),
        ("pushed", {"offer": 1, "lo": 5, "hi": 2}),
        ("fetch", {"offer": 1, "token": "ab", "cache": 0, "blocks": [1], "x": 1}),
    ],
)
async def test_a_malformed_request_gets_an_error_ack_and_the_link_stays(kind, fields) -> None:
    async with pair() as p:
        await linked(p)
        link = p.link(p.decode, P_ID)
        ack = await inject(link, kind, **fields)
        assert code_of(ack) == int(S.LLM_PARAM_INVALID)
        assert not link.closed
        await linked(p)  # the same link still serves fetches
        assert p.link(p.decode, P_ID) is link


async def test_a_handler_failure_is_answered_not_swallowed() -> None:
    async with pair() as p:
        await linked(p)

        async def broken(link: Any, msg: Any) -> None:
            raise RuntimeError("a bug in a handler")

        p.prefill._links.on("renew", broken)
        link = p.link(p.decode, P_ID)
        ack = await inject(link, "renew", offer=1, token="ab")
        assert code_of(ack) == int(S.LLM_FAILED)
        assert not link.closed


async def test_a_ticket_with_a_malformed_token_is_refused_before_the_wire() -> None:
    """The decode's own calls with an edited ticket fail with LLM_PARAM_INVALID; nothing is
    sent, no link is cut (an abort of it must not unlink the offerer)."""
    async with pair() as p:
        await linked(p)
        link = p.link(p.decode, P_ID)
        ticket = await p.prefill.handoff.offer("r", p.pcache, [1])
        bad = {**ticket.to_dict(), "token": "\ud800"}
        for call in (
            p.decode.handoff.fetch(bad, p.dcache, [2]),
            p.decode.handoff.renew(bad),
            p.decode.handoff.abort(bad),
        ):
            with pytest.raises(dxl.LLMException) as info:
                await call
            assert info.value.status_code == S.LLM_PARAM_INVALID
        assert p.link(p.decode, P_ID) is link and not link.closed
        assert p.prefill.handoff.live() == 1
        await p.decode.handoff.fetch(ticket, p.dcache, [2])
        assert p.dkv.matches(ROWS, [2], P_SEED, ROWS, [1])


# ====================================================================== item 3: edited tickets
def edited(ticket: Ticket, **changes: Any) -> Ticket:
    return Ticket.from_dict({**ticket.to_dict(), **changes})


@pytest.mark.parametrize(
    "changes",
    [
        {"block_ids": [5, 6]},  # other requests' blocks
        {"block_ids": [0, 1, 2]},
        {"layers": [1, 2]},
        {"tensors_per_layer": 1},
        {"cache_id": 12345},
    ],
)
async def test_an_edited_push_ticket_moves_nothing(changes) -> None:
    """The decode offers destination blocks [0, 1]; an honest prefill pushes with a ticket
    edited on its way: the claim is refused before anything moves, the decode's other blocks
    keep their bytes, and the offer stays live for the real ticket."""
    async with pair() as p:
        ticket = await p.decode.handoff.offer_destination("r", p.dcache, [0, 1])
        bad = edited(ticket, **changes)
        n = len(bad.block_ids)
        with pytest.raises(dxl.LLMException) as info:
            await p.prefill.handoff.push(bad, p.pcache, [8, 9, 10][:n])
        assert info.value.status_code == S.LLM_PARAM_INVALID, info.value
        assert p.dkv.untouched(ROWS, range(BLOCKS))
        assert p.decode.handoff.live() == 1 and p.decode.handoff.poll_finished() == []
        await p.prefill.handoff.push(ticket, p.pcache, [8, 9])
        await p.prefill.handoff.complete(ticket)
        [end] = p.decode.handoff.poll_finished()
        assert (end.request_id, end.reason) == ("r", Ended.DONE)
        assert p.dkv.matches(ROWS, [0, 1], P_SEED, ROWS, [8, 9])
        assert p.dkv.untouched(ROWS, range(2, BLOCKS))


async def test_a_held_claim_does_not_carry_an_edited_ticket() -> None:
    """A push with the real ticket claims the offer; a second push of the same offer with an
    edited ticket is refused by the pusher itself (the offerer checked the claim's ticket)."""
    async with pair() as p:
        ticket = await p.decode.handoff.offer_destination("r", p.dcache, [0, 1], layers=range(1))
        await p.prefill.handoff.push(ticket, p.pcache, [8, 9])
        with pytest.raises(dxl.LLMException) as info:
            await p.prefill.handoff.push(edited(ticket, block_ids=[5, 6]), p.pcache, [8, 9])
        assert info.value.status_code == S.LLM_PARAM_INVALID
        assert p.dkv.untouched(ROWS, range(2, BLOCKS))


async def test_a_raw_claim_of_other_blocks_is_refused() -> None:
    """A linked peer claiming an offer with blocks that are not the offer's gets an error ack;
    the offer stays unclaimed (its real pusher may claim it)."""
    async with pair() as p:
        await linked(p)
        ticket = await p.decode.handoff.offer_destination("r", p.dcache, [0, 1])
        view = {"layers": [], "tensors_per_layer": 2, "block_bytes": BB, "num_tensors": TENSORS}
        claim = {"offer": ticket.offer_id, "token": ticket.token, "cache": ticket.cache_id}
        link = p.link(p.prefill, D_ID)
        ack = await inject(link, "claim", **claim, blocks=[5, 6], **view)
        assert code_of(ack) == int(S.LLM_PARAM_INVALID)
        await p.prefill.handoff.push(ticket, p.pcache, [8, 9])
        await p.prefill.handoff.complete(ticket)
        assert [e.reason for e in p.decode.handoff.poll_finished()] == [Ended.DONE]


@pytest.mark.parametrize(
    "changes",
    [{"layers": [0, 1]}, {"block_ids": [1, 2, 3]}, {"cache_id": 777}, {"num_tensors": 2}],
)
async def test_an_edited_pull_ticket_is_refused_by_the_offerer(changes) -> None:
    async with pair() as p:
        ticket = await p.prefill.handoff.offer("r", p.pcache, [1, 2])
        bad = edited(ticket, **changes)
        n = len(bad.block_ids)
        with pytest.raises(dxl.LLMException) as info:
            await p.decode.handoff.fetch(bad, p.dcache, [3, 4, 5][:n])
        assert info.value.status_code == S.LLM_PARAM_INVALID, info.value
        assert p.dkv.untouched(ROWS, range(BLOCKS))
        assert p.prefill.handoff.live() == 1
        await p.decode.handoff.fetch(ticket, p.dcache, [3, 4])
        assert p.dkv.matches(ROWS, [3, 4], P_SEED, ROWS, [1, 2])


async def test_pushed_layers_outside_the_offer_are_refused() -> None:
    """A claimer reporting layers the offer does not hold gets an error ack; the decode's
    on_layer never hears of them, and the offer still completes."""
    async with pair() as p:
        seen: list[tuple[int, int]] = []
        ticket = await p.decode.handoff.offer_destination(
            "r", p.dcache, [0], layers=range(1), on_layer=lambda lo, hi: seen.append((lo, hi))
        )
        await p.prefill.handoff.push(ticket, p.pcache, [8])  # claims it, layer 0 landed
        link = p.link(p.prefill, D_ID)
        ack = await inject(link, "pushed", offer=ticket.offer_id, lo=0, hi=1000)
        assert code_of(ack) == int(S.LLM_PARAM_INVALID)
        assert seen == [(0, 1)] and not link.closed
        await p.prefill.handoff.complete(ticket)
        assert [e.reason for e in p.decode.handoff.poll_finished()] == [Ended.DONE]


# ====================================================================== item 10: growth
def cache_entry(cache_id: int, n_addrs: int) -> dict[str, Any]:
    return {
        "id": cache_id,
        "gen": 1,
        "blocks": True,
        "num_tensors": n_addrs,
        "tensor_size": 4096,
        "units": 1,
        "placement": 0,
        "device": 0,
        "addrs": [(1 << 32) + 4096 * i for i in range(n_addrs)],
        "model_id": None,
        "keys": [],
        "shm": [],
    }


async def test_registrations_a_peer_advertises_are_bounded_per_link() -> None:
    """reg_add frames of 60k addresses each: past the per-link bound one is refused with an
    error ack and nothing of it is stored; the link stays, and a reg_del makes room again."""
    from dxl.engine.registry import MAX_PEER_ITEMS

    async with pair() as p:
        await linked(p)
        link = p.link(p.decode, P_ID)  # the decode's end: it sends, the prefill stores
        registry = p.link(p.prefill, D_ID).registry
        before = set(registry.caches)
        n = 60_000
        codes = []
        for i in range(MAX_PEER_ITEMS // n + 1):
            codes.append(code_of(await inject(link, "reg_add", cache=cache_entry(1000 + i, n))))
        full = MAX_PEER_ITEMS // n
        assert codes[:full] == [0] * full
        assert codes[full] == int(S.LLM_OUT_OF_MEMORY)
        assert set(registry.caches) - before == {1000 + i for i in range(full)}
        assert registry.items <= MAX_PEER_ITEMS and not link.closed
        assert code_of(await inject(link, "reg_del", id=1000, gen=1)) == 0
        assert code_of(await inject(link, "reg_add", cache=cache_entry(1000 + full, n))) == 0
        assert 1000 + full in registry.caches and not link.closed


async def test_the_number_of_caches_a_peer_advertises_is_bounded(monkeypatch) -> None:
    from dxl.engine import registry as reg

    monkeypatch.setattr(reg, "MAX_PEER_CACHES", 8)
    async with pair() as p:
        await linked(p)
        link = p.link(p.decode, P_ID)
        registry = p.link(p.prefill, D_ID).registry
        room = 8 - len(registry.caches)
        codes = [
            code_of(await inject(link, "reg_add", cache=cache_entry(2000 + i, 1)))
            for i in range(room + 3)
        ]
        assert codes == [0] * room + [int(S.LLM_OUT_OF_MEMORY)] * 3
        assert len(registry.caches) == 8
        # a new generation of an advertised cache replaces it: no room needed
        again = {**cache_entry(2000, 2), "gen": 2}
        assert code_of(await inject(link, "reg_add", cache=again)) == 0
        assert registry.caches[2000].gen == 2 and not link.closed


async def test_tickets_naming_many_clusters_leave_nothing_behind(caplog) -> None:
    """Fetches of tickets naming distinct, unreachable cluster ids each fail; no link-setup
    entry stays behind, and the log is not flooded."""
    async with pair() as p:
        ticket = await p.prefill.handoff.offer("r", p.pcache, [1])
        linker = p.decode.handoff._fetching._linker
        caplog.set_level(logging.WARNING, logger="dxl")
        for i in range(200):
            bad = edited(ticket, cluster_id=5000 + i, endpoint="127.0.0.1:1")
            with pytest.raises(dxl.LLMException) as info:
                await p.decode.handoff.fetch(bad, p.dcache, [2], timeout_s=5)
            assert info.value.status_code == S.LLM_LINK_FAILED
        assert len(linker) == 0
        lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(lines) <= 20, [r.getMessage() for r in lines[:30]]


async def test_renewals_cannot_keep_an_offer_for_ever(monkeypatch) -> None:
    """Renewals past MAX_LEASES leases after the offer was made are refused (LLM_TIMEOUT); the
    offer then expires as its lease runs out."""
    from dxl.handoff import leases

    monkeypatch.setattr(leases, "MAX_LEASES", 3)
    async with pair() as p:
        await linked(p)
        p.prefill.handoff.poll_finished()
        ticket = await p.prefill.handoff.offer("r", p.pcache, [1], lease_s=1.0)
        renewals = 0
        while True:
            try:
                await p.decode.handoff.renew(ticket)
            except dxl.LLMException as exc:
                assert exc.status_code == S.LLM_TIMEOUT, exc
                break
            renewals += 1
            assert renewals < 200, "renewals were never refused"
            await asyncio.sleep(0.05)  # the renewal cadence, not a sync
        async with asyncio.timeout(20):
            end = await anext(p.prefill.handoff.finished())
        assert (end.request_id, end.reason) == ("r", Ended.EXPIRED)


# ====================================================================== item 9: endpoints
@pytest.mark.parametrize("endpoint", ["", "a:b", "127.0.0.1:99999999", "[zz]:1", "::1:80"])
async def test_a_malformed_ticket_endpoint_is_a_parameter_error(endpoint) -> None:
    async with pair() as p:
        ticket = await p.prefill.handoff.offer("r", p.pcache, [1])
        bad = edited(ticket, cluster_id=999, endpoint=endpoint)
        for call in (
            p.decode.handoff.fetch(bad, p.dcache, [2]),
            p.decode.handoff.renew(bad),
            p.decode.handoff.abort(bad),
        ):
            with pytest.raises(dxl.LLMException) as info:
                await call
            assert info.value.status_code == S.LLM_PARAM_INVALID, info.value
            assert "endpoint" in str(info.value)
        assert p.decode.stats()["links"] == {} and p.prefill.handoff.live() == 1
