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


def _unused() -> tuple[Any, ...]:  # keep imports used by later sections
    return (Ended, Ticket, logging)
