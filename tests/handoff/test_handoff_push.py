"""Push-mode handoff: the decode offers destination blocks, the prefill (another process)
pushes into them layer by layer and completes; aborts from either side mid-transfer (no byte
of a reused block reaches the decode); the lease taking the blocks back from a stalled pusher."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from handoff_kit import (
    BIG,
    DECODE_SEED,
    NEW_SEED,
    P_ID,
    PREFILL_SEED,
    SMALL,
    Decode,
    Ends,
    decode_engine,
    layers_of,
    prefill_starter,
    retry_until,
)
from patterns import layers_landed, refill, words_of_seed
from peer import PeerError
from transports import params, transport_options
from waiting import async_wait_until

from dxl.handoff import Ended

pytestmark = [pytest.mark.multiproc, pytest.mark.cma]


@pytest.mark.parametrize("transport", params("cma"))
async def test_push_layer_by_layer_then_complete(make_peer, transport):
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill(options=transport_options(transport))
    n_layers = layers_of(SMALL)
    async with decode_engine(options=transport_options(transport)) as d:
        seen: list[tuple[int, int]] = []
        ticket = await d.h.offer_destination(
            "r", d.cache, [5, 6, 7], on_layer=lambda lo, hi: seen.append((lo, hi))
        )
        assert ticket.kind == "push"
        ends = d.h.finished()
        pushed = await prefill.aio(
            "push_layers", ticket=ticket.to_json(), name="kv", blocks=[1, 2, 3]
        )
        assert pushed == n_layers
        assert seen == [(layer, layer + 1) for layer in range(n_layers)]
        assert d.holds([5, 6, 7], PREFILL_SEED, [1, 2, 3])
        assert d.untouched([0, 1, 2, 3, 4, 8])
        async with asyncio.timeout(20):
            end = await anext(ends)
        assert (end.request_id, end.kind, end.reason, end.peer) == ("r", "push", Ended.DONE, P_ID)
        assert end.block_ids == [5, 6, 7]

        # a layer range: the pusher writes those layers only
        part = await d.h.offer_destination("r2", d.cache, [9], layers=range(1, 3))
        assert await prefill.aio("push_layers", ticket=part.to_json(), name="kv", blocks=[4]) == 2
        assert d.buf.matches(range(2, 6), [9], PREFILL_SEED, range(2, 6), [4])
        assert d.buf.untouched([0, 1, 6, 7], [9])
        async with asyncio.timeout(20):
            end = await anext(ends)
        assert (end.request_id, end.reason) == ("r2", Ended.DONE)
        assert d.h.poll_finished() == []  # each ended once
        assert d.h.live() == 0
        assert (await prefill.aio("handoff_stats"))["claims"] == 0
        # complete() again: the pusher holds no claim any more
        with pytest.raises(PeerError, match="no such claim"):
            await prefill.aio("complete", ticket=part.to_json())


async def test_push_aborted_by_the_decode_mid_transfer(make_peer):
    """The decode takes its destination blocks back while the prefill pushes into them, and
    reuses them at once: they keep the new pattern."""
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill(layout=BIG)
    src, dst = [0, 1, 2, 3], [4, 5, 6, 7]

    async def one_try(d: Decode, ends: Ends, attempt: int) -> bool:
        refill(d.buf, dst, DECODE_SEED)
        seen: list[int] = []
        ticket = await d.h.offer_destination(
            f"r{attempt}", d.cache, dst, on_layer=lambda lo, hi: seen.append(lo)
        )
        pusher = await prefill.aio(
            "spawn",
            command="push_layers",
            args={"ticket": ticket.to_json(), "name": "kv", "blocks": src},
        )
        await async_wait_until(lambda: seen or d.h.live() == 0, 20, "a layer to land")
        await d.h.abort(ticket)
        refill(d.buf, dst, NEW_SEED)
        layers_before = len(seen)
        try:
            await prefill.aio("join", tid=pusher)
            pushed_all = True
        except PeerError as exc:
            assert exc.type_name == "FetchError", exc
            pushed_all = False
        [record] = [r for r in await ends.poll() if r["offer_id"] == ticket.offer_id]
        if pushed_all:
            assert record["reason"] == "done"
            return False
        assert record["reason"] == "aborted", record
        assert 1 <= layers_before < layers_of(BIG)
        assert d.holds(dst, NEW_SEED, dst)  # the pusher stopped before abort returned
        return True

    async with decode_engine(BIG) as d:
        ends = Ends(engine=d.eng)
        await retry_until(lambda attempt: one_try(d, ends, attempt), "the abort mid-push")
        # a whole push on the same link after it: nothing of the aborted one is left to land
        ticket = await d.h.offer_destination("after", d.cache, [0])
        await prefill.aio("push_layers", ticket=ticket.to_json(), name="kv", blocks=[7])
        assert d.holds([0], PREFILL_SEED, [7])
        assert d.holds(dst, NEW_SEED, dst)
        await ends.poll()
        assert len(ends.records) == len({r["offer_id"] for r in ends.records})
        assert d.h.live() == 0 and (await prefill.aio("handoff_stats"))["claims"] == 0


async def test_push_aborted_by_the_prefill_mid_transfer(make_peer):
    """The prefill stops pushing and reuses its source blocks the moment abort returns: none
    of the new pattern reaches the decode."""
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill(layout=BIG)
    src, dst = [0, 1, 2, 3], [4, 5, 6, 7]
    n_layers = layers_of(BIG)

    async def one_try(d: Decode, ends: Ends, attempt: int) -> bool:
        refill(d.buf, dst, DECODE_SEED)
        await prefill.aio("fill", name="kv", blocks=src, seed=PREFILL_SEED)
        seen: list[int] = []
        aborts: list[asyncio.Task[None]] = []
        tickets: list[str] = []

        def abort_at_first_layer(lo: int, hi: int) -> None:
            seen.append(lo)
            if len(seen) == 1:
                abort = prefill.aio(
                    "abort", ticket=tickets[0], name="kv", refill=src, seed=NEW_SEED
                )
                aborts.append(asyncio.create_task(abort))

        ticket = await d.h.offer_destination(
            f"r{attempt}", d.cache, dst, on_layer=abort_at_first_layer
        )
        t = ticket.to_json()
        tickets.append(t)
        pusher = await prefill.aio(
            "spawn", command="push_layers", args={"ticket": t, "name": "kv", "blocks": src}
        )
        # the child answers one command at a time: join only once the abort went in
        await async_wait_until(lambda: aborts or d.h.live() == 0, 20, "a layer or the end")
        await asyncio.gather(*aborts)
        try:
            await prefill.aio("join", tid=pusher)
            pushed_all = True
        except PeerError as exc:
            assert exc.type_name == "FetchError", exc
            pushed_all = False
        record = await ends.wait_end(t)
        assert words_of_seed(d.buf, dst, NEW_SEED) == 0
        if pushed_all:
            assert record["reason"] == "done"
            return False
        assert record["reason"] == "aborted", record
        landed, untouched = layers_landed(d.buf, dst, PREFILL_SEED, src, DECODE_SEED, n_layers)
        assert landed == seen  # what landed was announced, and landed whole
        assert len(landed) + len(untouched) == n_layers
        assert 1 <= len(seen) < n_layers
        return True

    async with decode_engine(BIG) as d:
        ends = Ends(engine=d.eng)
        await retry_until(lambda attempt: one_try(d, ends, attempt), "the abort mid-push")
        ticket = await d.h.offer_destination("after", d.cache, [0])
        await prefill.aio("push_layers", ticket=ticket.to_json(), name="kv", blocks=[7])
        assert d.holds([0], PREFILL_SEED, [7])
        assert words_of_seed(d.buf, dst, NEW_SEED) == 0
        assert d.h.live() == 0 and (await prefill.aio("handoff_stats"))["claims"] == 0


async def test_push_lease_takes_the_blocks_back_from_a_stalled_pusher(make_peer):
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill()
    async with decode_engine() as d:
        ends = Ends(engine=d.eng)
        # never claimed: expires
        idle = await d.h.offer_destination("idle", d.cache, [1], lease_s=0.2)
        assert (await ends.wait_end(idle))["reason"] == "expired"
        # claimed, one layer pushed, then the pusher stalls: the lease ends it (linked first,
        # so the claim comes well within the lease)
        await d.eng.link_clusters([prefill.cluster_info()])
        ticket = await d.h.offer_destination("stalled", d.cache, [2, 3], lease_s=1.0)
        t = ticket.to_json()
        await prefill.aio("handoff_push", ticket=t, name="kv", blocks=[8, 9], layers=[0, 1])
        assert d.buf.matches([0, 1], [2, 3], PREFILL_SEED, [0, 1], [8, 9])
        record = await ends.wait_end(ticket)
        assert record["reason"] == "aborted" and "no progress" in record["detail"], record
        assert record["peer"] == P_ID
        refill(d.buf, [2, 3], NEW_SEED)  # the decode reuses them
        with pytest.raises(PeerError) as err:  # the pusher wakes up: too late
            await prefill.aio("handoff_push", ticket=t, name="kv", blocks=[8, 9], layers=[1, 2])
        assert err.value.type_name == "FetchError"
        assert d.holds([2, 3], NEW_SEED, [2, 3])
        assert (await prefill.aio("handoff_stats"))["claims"] == 0
        await ends.poll()
        assert [r["reason"] for r in ends.records] == ["expired", "aborted"]
        assert d.h.live() == 0


async def test_pusher_aborting_during_its_claim_writes_nothing_after(make_peer):
    """The pusher aborts while its first push still waits for the claim's answer: that push
    must not go on to write (the decode ended the offer when told, and reuses the blocks), and
    the pusher must hold no claim afterwards."""
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill(layout=BIG)
    src, dst = [0, 1, 2, 3], [4, 5, 6, 7]

    async def one_try(d: Decode, ends: Ends, attempt: int) -> bool:
        refill(d.buf, dst, DECODE_SEED)
        await prefill.aio("fill", name="kv", blocks=src, seed=PREFILL_SEED)
        seen: list[int] = []
        ticket = await d.h.offer_destination(
            f"r{attempt}", d.cache, dst, on_layer=lambda lo, hi: seen.append(lo)
        )
        t = ticket.to_json()
        args = {"ticket": t, "name": "kv", "blocks": src}  # every layer in one write
        pusher = await prefill.aio("spawn", command="handoff_push", args=args)
        await prefill.aio("abort", ticket=t, name="kv", refill=src, seed=NEW_SEED)
        record = await ends.wait_end(ticket)
        assert record["reason"] == "aborted", record
        with contextlib.suppress(PeerError):
            await prefill.aio("join", tid=pusher)
        assert words_of_seed(d.buf, dst, NEW_SEED) == 0
        if seen:  # the push got through before the abort: it landed whole, announced
            assert d.holds(dst, PREFILL_SEED, src)
        else:  # the abort came first: nothing may land, before or after the offer ended
            assert d.holds(dst, DECODE_SEED, dst), "a push landed after the pusher aborted"
        assert (await prefill.aio("handoff_stats"))["claims"] == 0
        # hit: the decode had accepted the claim (the record names the pusher) when the abort
        # came, and no layer was pushed
        return record["peer"] == P_ID and not seen

    async with decode_engine(BIG) as d:
        ends = Ends(engine=d.eng)
        await retry_until(
            lambda attempt: one_try(d, ends, attempt), "the abort during a claim", tries=30
        )
        assert d.h.live() == 0
