"""Exactly-once ends under an abort racing the transfer's end, many times over: whatever wins,
each offer ends exactly once on the offering side, and the other side's outcome agrees with it
(done: the fetch or push returned and every byte is there; aborted: it failed, and each layer
landed whole or not at all). Aborts come from either side, by ticket or by request id, at once
or as layer k lands (k swept over the whole transfer, up to the last layer)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from handoff_kit import (
    DECODE_SEED,
    PREFILL_SEED,
    Decode,
    Ends,
    decode_engine,
    layers_of,
    prefill_starter,
)
from patterns import layers_landed, refill
from peer import Peer, PeerError
from waiting import async_wait_until

from dxl.handoff import FetchError

pytestmark = [pytest.mark.multiproc, pytest.mark.cma]

MEDIUM = {"num_tensors": 32, "num_blocks": 8, "block_bytes": 16 << 10}  # 16 layers
N_LAYERS = layers_of(MEDIUM)
ROUNDS = 40
SRC, DST = [0, 1, 2, 3], [4, 5, 6, 7]


def plan(i: int) -> tuple[str, str, int | None]:
    """Round ``i``: who aborts, how (ticket or request id), and as which layer lands (None: at
    once, as the transfer starts)."""
    side = ("decode", "prefill")[i % 2]
    how = ("ticket", "request_id")[(i // 2) % 2]
    points: list[int | None] = [None, 0, N_LAYERS // 2, N_LAYERS - 2, N_LAYERS - 1]
    return side, how, points[(i // 4) % len(points)]


def check_outcome(d: Decode, i: int, record: dict, succeeded: bool) -> None:
    """The offering side's one end agrees with the other side's outcome, and the bytes too."""
    assert record["reason"] == ("done" if succeeded else "aborted"), (i, record)
    if succeeded:
        assert d.holds(DST, PREFILL_SEED, SRC)
    else:
        landed, untouched = layers_landed(d.buf, DST, PREFILL_SEED, SRC, DECODE_SEED, N_LAYERS)
        assert len(landed) + len(untouched) == N_LAYERS, (i, landed, untouched)


async def pull_round(d: Decode, prefill: Peer, ends: Ends, i: int) -> str:
    side, how, at = plan(i)
    refill(d.buf, DST, DECODE_SEED)
    rid = f"r{i}"
    ticket = await prefill.aio("offer", name="kv", request_id=rid, blocks=SRC)
    aborts: list[asyncio.Task[None]] = []
    during: list[bool] = []  # the fetch was still pending when the abort went out
    fetch: list[asyncio.Task[None]] = []

    def abort() -> None:
        during.append(not fetch or not fetch[0].done())
        if side == "decode":  # the fetcher aborts: by ticket (it knows no request ids)
            aborts.append(asyncio.create_task(d.h.abort(ticket)))
        else:
            target = ticket if how == "ticket" else rid
            aborts.append(asyncio.create_task(prefill.aio("abort", ticket=target)))

    def on_layer(lo: int, hi: int) -> None:
        if lo == at:
            abort()

    fetch.append(asyncio.create_task(d.h.fetch(ticket, d.cache, DST, on_layer=on_layer)))
    if at is None:
        abort()
    try:
        await fetch[0]
        fetched = True
    except FetchError:
        fetched = False
    await asyncio.gather(*aborts)  # an abort after the end is no error either
    record = await ends.wait_end(ticket)
    check_outcome(d, i, record, fetched)
    return (
        "done, the abort sent during the fetch"
        if fetched and during == [True]
        else record["reason"]
    )


async def test_pull_abort_racing_done_ends_each_offer_once(make_peer):
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill(layout=MEDIUM)
    ends = Ends(prefill)
    outcomes: Counter[str] = Counter()
    async with decode_engine(MEDIUM) as d:
        for i in range(ROUNDS):
            outcomes[await pull_round(d, prefill, ends, i)] += 1
        await ends.poll()
        assert len(ends.records) == ROUNDS  # exactly one end per offer, whatever won
        assert len({r["offer_id"] for r in ends.records}) == ROUNDS
        assert await prefill.aio("live") == 0
        assert d.eng.stats()["handoff"]["fetches_in_flight"] == 0
    print(f"pull: {dict(outcomes)}")
    assert outcomes["aborted"], outcomes  # the abort won sometimes
    assert outcomes["done"] + outcomes["done, the abort sent during the fetch"], outcomes


async def push_round(d: Decode, prefill: Peer, ends: Ends, i: int) -> str:
    side, how, at = plan(i)
    refill(d.buf, DST, DECODE_SEED)
    rid = f"r{i}"
    aborts: list[asyncio.Task[None]] = []
    tickets: list[str] = []

    def abort() -> None:
        if side == "decode":  # the offerer of the destination: by ticket or request id
            target = tickets[0] if how == "ticket" else rid
            aborts.append(asyncio.create_task(d.h.abort(target)))
        else:  # the pusher: by ticket
            aborts.append(asyncio.create_task(prefill.aio("abort", ticket=tickets[0])))

    def on_layer(lo: int, hi: int) -> None:
        if lo == at:
            abort()

    ticket = await d.h.offer_destination(rid, d.cache, DST, on_layer=on_layer)
    tickets.append(ticket.to_json())
    args = {"ticket": tickets[0], "name": "kv", "blocks": SRC}
    pusher = await prefill.aio("spawn", command="push_layers", args=args)
    if at is None:
        abort()
    # the child answers one command at a time: join only once the abort went in
    await async_wait_until(lambda: aborts or d.h.live() == 0, 20, "the abort or the end")
    await asyncio.gather(*aborts)
    try:
        await prefill.aio("join", tid=pusher)
        pushed = True
    except PeerError as exc:  # a push refused (FetchError), or complete() without a claim
        assert exc.type_name in ("FetchError", "LLMException"), exc
        pushed = False
    record = await ends.wait_end(ticket)
    check_outcome(d, i, record, pushed)
    return record["reason"]


async def test_push_abort_racing_complete_ends_each_offer_once(make_peer):
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill(layout=MEDIUM)
    outcomes: Counter[str] = Counter()
    async with decode_engine(MEDIUM) as d:
        ends = Ends(engine=d.eng)
        for i in range(ROUNDS):
            outcomes[await push_round(d, prefill, ends, i)] += 1
        await ends.poll()
        assert len(ends.records) == ROUNDS
        assert len({r["offer_id"] for r in ends.records}) == ROUNDS
        assert d.h.live() == 0
        assert (await prefill.aio("handoff_stats"))["claims"] == 0
    print(f"push: {dict(outcomes)}")
    assert outcomes["done"] and outcomes["aborted"], outcomes
