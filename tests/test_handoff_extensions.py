"""The handoff additions a vLLM connector needs: an offer whose id and token the caller chose
(the scheduler hands the ticket out before its worker offers), a fetch of the offer's last
blocks only (the decode holds the first ones from its prefix cache), and an abort of another
engine's offer without an existing link (a decode that needs nothing of it)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from waiting import async_wait_until

import dxl
from dxl.handoff import Ended, Ticket
from dxl.handoff.handoff import CALLER_OFFER_IDS
from dxl.testing import KVBuffers

TENSORS, BLOCKS, BB = 4, 8, 256


async def _engine(cluster_id: int, seed: int, fill: bool):
    eng = dxl.Engine(cluster_id, dxl.LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:0"})
    await eng.start()
    kv = KVBuffers(TENSORS, BLOCKS, BB, seed=seed, fill=fill)
    cache = await eng.register_blocks_cache(kv.desc(), kv.addrs, remote_accessible=True)
    return eng, kv, cache


@pytest.fixture
async def pair() -> AsyncIterator[tuple]:
    p, pkv, pcache = await _engine(101, seed=7, fill=True)
    d, dkv, dcache = await _engine(102, seed=0, fill=False)
    try:
        yield p, pkv, pcache, d, dkv, dcache
    finally:
        await d.close()
        await p.close()


async def test_chosen_offer_id_and_token_make_the_ticket(pair) -> None:
    p, _, pcache, d, dkv, dcache = pair
    token = secrets.token_hex(16)
    oid = CALLER_OFFER_IDS + 5
    t = await p.handoff.offer("r1", pcache, [1, 2], offer_id=oid, token=token)
    assert (t.offer_id, t.token) == (oid, token)
    await d.handoff.fetch(Ticket.of(t.to_dict()), dcache, [5, 6])
    assert dkv.matches(range(TENSORS), [5, 6], 7, range(TENSORS), [1, 2])
    [end] = p.handoff.poll_finished()
    assert (end.request_id, end.reason) == ("r1", Ended.DONE)


@pytest.mark.parametrize(
    ("offer_id", "token"),
    [
        (CALLER_OFFER_IDS - 1, "ab" * 16),  # in the engine's own range
        (CALLER_OFFER_IDS, "ab" * 8),  # token too short
        (CALLER_OFFER_IDS, "zz" * 16),  # not hex
        (CALLER_OFFER_IDS, None),  # one without the other
    ],
)
async def test_bad_chosen_identity_is_refused(pair, offer_id, token) -> None:
    p, _, pcache, *_ = pair
    with pytest.raises(dxl.LLMException) as exc:
        await p.handoff.offer("r1", pcache, [1], offer_id=offer_id, token=token)
    assert exc.value.status_code == dxl.LLMStatusCode.LLM_PARAM_INVALID
    assert p.handoff.live() == 0


async def test_a_live_chosen_id_is_not_reused(pair) -> None:
    p, _, pcache, *_ = pair
    await p.handoff.offer("r1", pcache, [1], offer_id=CALLER_OFFER_IDS, token="ab" * 16)
    with pytest.raises(dxl.LLMException) as exc:
        await p.handoff.offer("r2", pcache, [2], offer_id=CALLER_OFFER_IDS, token="cd" * 16)
    assert exc.value.status_code == dxl.LLMStatusCode.LLM_REPEAT_REQUEST


async def test_fewer_destination_blocks_take_the_offers_tail(pair) -> None:
    p, _, pcache, d, dkv, dcache = pair
    t = await p.handoff.offer("r1", pcache, [1, 2, 3, 4])
    await d.handoff.fetch(t, dcache, [6, 7])
    assert dkv.matches(range(TENSORS), [6, 7], 7, range(TENSORS), [3, 4])
    assert dkv.untouched(range(TENSORS), [0, 1, 2, 3, 4, 5])
    [end] = p.handoff.poll_finished()
    assert end.reason is Ended.DONE
    assert end.block_ids == [1, 2, 3, 4]  # the holder's blocks, all free again


async def test_more_destination_blocks_than_offered_are_refused(pair) -> None:
    p, _, pcache, d, _, dcache = pair
    t = await p.handoff.offer("r1", pcache, [1, 2])
    with pytest.raises(dxl.LLMException) as exc:
        await d.handoff.fetch(t, dcache, [5, 6, 7])
    assert exc.value.status_code == dxl.LLMStatusCode.LLM_PARAM_INVALID


async def test_abort_of_another_engines_offer_links_first(pair) -> None:
    p, _, pcache, d, *_ = pair
    t = await p.handoff.offer("r1", pcache, [1, 2])
    assert d.handoff.stats()["per_peer"] == {}  # never linked
    await d.handoff.abort(t.to_dict())
    ends = await async_wait_until(p.handoff.poll_finished, 10, "the offer to end")
    assert [(e.request_id, e.reason) for e in ends] == [("r1", Ended.ABORTED)]


async def test_abort_of_an_unreachable_offerer_returns(pair) -> None:
    p, _, pcache, d, *_ = pair
    t = await p.handoff.offer("r1", pcache, [1])
    gone = Ticket.of({**t.to_dict(), "cluster_id": 999, "endpoint": "127.0.0.1:1"})
    await asyncio.wait_for(d.handoff.abort(gone), 30)  # nobody to tell: the lease decides
    assert p.handoff.live() == 1


async def test_the_handoff_settings_are_the_engines_options() -> None:
    """dxl.HandoffLeaseS and dxl.HandoffMaxFetches reach the handoff: an offer that names no
    lease gets the option's, and max_fetches starts at the option's."""
    options = {
        "llm.listenIpInfo": "127.0.0.1:0",
        "dxl.HandoffLeaseS": "7.5",
        "dxl.HandoffMaxFetches": "3",
    }
    eng = dxl.Engine(103, dxl.LLMRole.PROMPT, options)
    await eng.start()
    try:
        kv = KVBuffers(TENSORS, BLOCKS, BB, seed=1, fill=True)
        cache = await eng.register_blocks_cache(kv.desc(), kv.addrs, remote_accessible=True)
        ticket = await eng.handoff.offer("r-settings", cache, [0, 1])
        assert ticket.lease_ms == 7500
        assert eng.handoff.max_fetches == 3
    finally:
        await eng.close()
