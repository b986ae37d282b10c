"""Tickets that must be refused: for another engine, forged (wrong token, unknown offer id),
replayed after done, a second fetcher of the same offer. Nothing moves in any refusal: the
destination stays untouched, and the real offer stays live and unclaimed (fetchable after)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from handoff_kit import (
    D_ID,
    P2_ID,
    P_ID,
    PREFILL_SEED,
    SMALL,
    Ends,
    decode_engine,
    loop_kind,
    prefill_starter,
)

import dxl
from dxl.handoff import FetchError, Ticket

pytestmark = [pytest.mark.multiproc, pytest.mark.cma]

S = dxl.LLMStatusCode
OTHER_SEED = 33


def forged(ticket: str, **changes: Any) -> str:
    return dataclasses.replace(Ticket.of(ticket), **changes).to_json()


async def refused(d, ticket: str, dst: list[int], code: S, match: str | None = None) -> None:
    """A fetch of ``ticket`` into ``dst`` fails with ``code`` and writes nothing."""
    with pytest.raises(dxl.LLMException, match=match) as err:
        await d.h.fetch(ticket, d.cache, dst, timeout_s=10)
    assert err.value.status_code == code, err.value
    assert d.untouched(dst), "a refused fetch wrote into the destination"


async def test_tickets_for_another_engine_are_refused(make_peer):
    start_prefill = prefill_starter(make_peer)
    a = start_prefill(P_ID)
    b = start_prefill(P2_ID, seed=OTHER_SEED)
    ends_a, ends_b = Ends(a), Ends(b)
    async with decode_engine() as d:
        ticket = await a.aio("offer", name="kv", request_id="r", blocks=[1, 2])
        on_b = await b.aio("offer", name="kv", request_id="r", blocks=[1, 2])
        t, tb = Ticket.of(ticket), Ticket.of(on_b)
        assert t.offer_id == tb.offer_id  # both engines number their offers alike
        await d.eng.link_clusters([b.cluster_info()])  # the decode knows b already

        # the ticket names this engine itself
        await refused(d, forged(ticket, cluster_id=D_ID), [3, 4], S.LLM_PARAM_INVALID)
        # a's offer, said to be b's (a router mixing engines up): b is another incarnation
        await refused(
            d,
            forged(ticket, cluster_id=P2_ID, endpoint=tb.endpoint),
            [3, 4],
            S.LLM_KV_CACHE_NOT_EXIST,
            "another incarnation",
        )
        # a's offer id and token, handed to b as b's ticket: b holds offer 1, not with that token
        await refused(
            d,
            forged(on_b, token=t.token),
            [3, 4],
            S.LLM_KV_CACHE_NOT_EXIST,
            "no such live offer",
        )
        # a's ticket pointing at b's address: b is not the cluster the ticket names
        await d.eng.unlink_clusters([a.cluster_info()])
        await refused(d, forged(ticket, endpoint=tb.endpoint), [3, 4], S.LLM_LINK_FAILED)
        # a push ticket is not fetched, a pull ticket not pushed into
        await refused(d, forged(ticket, kind="push"), [3, 4], S.LLM_PARAM_INVALID)
        with pytest.raises(dxl.LLMException) as err:
            await d.h.push(ticket, d.cache, [3, 4])
        assert err.value.status_code == S.LLM_PARAM_INVALID

        # nothing was claimed or ended on either engine; both offers are whole
        assert await a.aio("live") == 1 and await b.aio("live") == 1
        assert await ends_a.poll() == [] and await ends_b.poll() == []
        await d.h.fetch(ticket, d.cache, [3, 4])
        await d.h.fetch(on_b, d.cache, [5, 6])
        assert d.holds([3, 4], PREFILL_SEED, [1, 2]) and d.holds([5, 6], OTHER_SEED, [1, 2])
        assert [r["reason"] for r in await ends_a.poll()] == ["done"]
        assert [r["reason"] for r in await ends_b.poll()] == ["done"]


async def test_forged_tickets_are_refused(make_peer):
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill()
    ends = Ends(prefill)
    async with decode_engine() as d:
        ticket = await prefill.aio("offer", name="kv", request_id="r", blocks=[1, 2])
        t = Ticket.of(ticket)
        wrong_token = forged(ticket, token="0" * len(t.token))
        unknown = forged(ticket, offer_id=t.offer_id + 1000)
        for bad in (wrong_token, unknown):
            await refused(d, bad, [3, 4], S.LLM_KV_CACHE_NOT_EXIST, "no such live offer")
            with pytest.raises(dxl.LLMException) as err:
                await d.h.renew(bad)
            assert err.value.status_code == S.LLM_KV_CACHE_NOT_EXIST
            await d.h.abort(bad)  # a forged abort ends nothing
            await prefill.aio("abort", ticket=bad)  # not even on the offering engine
        # nor does a tampered block list: the offerer copies the blocks it offered
        await prefill.aio("offer", name="kv", request_id="other", blocks=[9, 10])
        assert await prefill.aio("live") == 2 and await ends.poll() == []
        await d.h.fetch(forged(ticket, block_ids=[9, 10]), d.cache, [3, 4])
        assert d.holds([3, 4], PREFILL_SEED, [1, 2])
        [record] = await ends.poll()
        assert (record["offer_id"], record["reason"]) == (t.offer_id, "done")
        assert await prefill.aio("live") == 1  # "other" still waits for its fetcher


async def test_replayed_and_second_fetches_are_refused(make_peer):
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill()
    ends = Ends(prefill)
    async with decode_engine() as d:
        ticket = await prefill.aio("offer", name="kv", request_id="r", blocks=[1, 2])
        await d.h.fetch(ticket, d.cache, [3, 4])
        assert d.holds([3, 4], PREFILL_SEED, [1, 2])
        assert (await ends.wait_end(ticket))["reason"] == "done"
        # replayed after done, by the same decode or another one
        await refused(d, ticket, [5, 6], S.LLM_KV_CACHE_NOT_EXIST, "no such live offer")
        other = make_peer(D_ID + 10, role="DECODER", loop=loop_kind())
        other.call("register", name="kv", seed=44, model_id=0, **SMALL)
        with pytest.raises(Exception, match="no such live offer"):
            await other.aio("fetch", ticket=ticket, name="kv", blocks=[5, 6])
        assert other.call("untouched", name="kv", tensors=list(range(8)), blocks=[5, 6])

        # two fetchers at once: the offer serves one of them; the other is refused unwritten
        ticket = await prefill.aio("offer", name="kv", request_id="r2", blocks=[7, 8])
        results = await asyncio.gather(
            d.h.fetch(ticket, d.cache, [9, 10]),
            other.aio("fetch", ticket=ticket, name="kv", blocks=[9, 10]),
            return_exceptions=True,
        )
        winners = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
        assert len(winners) == 1, results
        loser = results[1 - winners[0]]
        assert isinstance(loser, FetchError) or getattr(loser, "type_name", None) == "FetchError", (
            loser
        )
        assert "fetched already" in str(loser) or "no such live offer" in str(loser), loser
        if winners == [0]:
            assert d.holds([9, 10], PREFILL_SEED, [7, 8])
            assert other.call("untouched", name="kv", tensors=list(range(8)), blocks=[9, 10])
        else:
            assert d.untouched([9, 10])
        record = await ends.wait_end(ticket)
        assert record["reason"] == "done"
        assert record["peer"] == (D_ID if winners == [0] else D_ID + 10)
        assert len(await ends.poll()) == 2 and await prefill.aio("live") == 0
