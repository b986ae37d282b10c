"""Pull-mode handoff between a prefill process and a decode process: done, the prefill killed
mid-fetch, aborts from either side mid-transfer (no byte of a reused block reaches the decode),
expired and renewed leases."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import pytest
from handoff_kit import (
    BIG,
    D_ID,
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
from transports import link_name, params, transport_options
from waiting import async_wait_until

import dxl
from dxl.handoff import FetchError, Ticket

pytestmark = [pytest.mark.multiproc, pytest.mark.cma]

S = dxl.LLMStatusCode


@pytest.mark.parametrize("transport", params("cma"))
async def test_done_bytes_verified_and_one_end_each_side(make_peer, transport):
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill(options=transport_options(transport))
    ends = Ends(prefill)
    async with decode_engine(options=transport_options(transport)) as d:
        ticket = await prefill.aio("offer", name="kv", request_id="r1", blocks=[3, 7, 8])
        assert Ticket.of(ticket).endpoint == f"{prefill.address[0]}:{prefill.address[1]}"
        seen: list[tuple[int, int]] = []
        await d.h.fetch(ticket, d.cache, [0, 1, 2], on_layer=lambda lo, hi: seen.append((lo, hi)))
        assert seen == [(layer, layer + 1) for layer in range(layers_of(SMALL))]
        assert d.holds([0, 1, 2], PREFILL_SEED, [3, 7, 8])
        assert d.untouched([3, 4, 5, 15])
        assert d.eng.stats()["links"][P_ID]["transport"] == link_name(transport)

        # a layer range, fetched whole (no on_layer): only those layers' tensors move
        ticket2 = await prefill.aio("offer", name="kv", request_id="r2", blocks=[9], layers=[1, 3])
        await d.h.fetch(ticket2, d.cache, [5])
        moved = range(2, 6)  # layers 1 and 2, K and V
        assert d.buf.matches(moved, [5], PREFILL_SEED, moved, [9])
        assert d.buf.untouched([0, 1, 6, 7], [5])

        [r1] = [r for r in await ends.poll() if r["request_id"] == "r1"]
        assert (r1["reason"], r1["peer"], r1["block_ids"]) == ("done", D_ID, [3, 7, 8])
        assert (await ends.wait_end(ticket2))["reason"] == "done"
        assert len(ends.records) == 2  # one end per offer, and no other
        assert await prefill.aio("live") == 0
        stats = d.eng.stats()["handoff"]
        assert stats["fetch"]["ops"] == 2 and stats["fetches_in_flight"] == 0
        assert stats["fetch_failures"] == {}
        prefill_stats = await prefill.aio("handoff_stats")
        assert prefill_stats["ended"] == {"done": 2, "failed": 0, "aborted": 0, "expired": 0}
    assert await ends.poll() and len(ends.records) == 2  # nothing more, even after the close


async def test_prefill_killed_mid_fetch_then_restarted(make_peer):
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill(layout=BIG)
    port = prefill.address[1]
    dst = [0, 1, 2, 3]
    async with decode_engine(BIG) as d:
        ticket = await prefill.aio("offer", name="kv", request_id="r1", blocks=[4, 5, 6, 7])
        seen: list[int] = []

        def kill_at_first_layer(lo: int, hi: int) -> None:
            seen.append(lo)
            if len(seen) == 1:
                prefill.kill(signal.SIGKILL)

        with pytest.raises(FetchError) as err:
            async with asyncio.timeout(30):  # the fetch's own timeout is 10 s
                await d.h.fetch(ticket, d.cache, dst, on_layer=kill_at_first_layer, timeout_s=10)
        assert 1 <= len(seen) < layers_of(BIG), seen  # it really was mid-fetch
        assert err.value.status_code in (S.LLM_LINK_FAILED, S.LLM_TIMEOUT), err.value
        assert err.value.request_id == "r1" and err.value.partial_blocks == dst
        assert d.eng.stats()["handoff"]["fetches_in_flight"] == 0
        prefill.proc.join(10)

        # the same prefill restarts: same cluster id, same address, a new incarnation
        again = start_prefill(layout=BIG, options={"llm.listenIpInfo": f"127.0.0.1:{port}"})
        assert again.address[1] == port
        assert await again.aio("live") == 0  # nothing of the old incarnation survived
        fresh = await again.aio("offer", name="kv", request_id="r1", blocks=[4, 5, 6, 7])
        assert Ticket.of(fresh).offer_id == Ticket.of(ticket).offer_id  # ids restart too
        with pytest.raises(FetchError, match="another incarnation") as err:
            await d.h.fetch(ticket, d.cache, [4, 5, 6, 7])
        assert err.value.status_code == S.LLM_KV_CACHE_NOT_EXIST
        assert d.untouched([4, 5, 6, 7])  # nothing moved
        assert await again.aio("live") == 1 and await again.aio("finished") == []
        await d.h.fetch(fresh, d.cache, [4, 5, 6, 7])  # the new offer is intact
        assert d.holds([4, 5, 6, 7], PREFILL_SEED, [4, 5, 6, 7])


async def test_prefill_aborts_mid_transfer_and_reuses_its_blocks(make_peer):
    """The prefill aborts while its copy runs (the decode saw a layer land), and refills the
    source blocks the moment abort returns: none of the new pattern may reach the decode."""
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill(layout=BIG)
    ends = Ends(prefill)
    src, dst = [0, 1, 2, 3], [4, 5, 6, 7]
    n_layers = layers_of(BIG)

    async def one_try(d: Decode, attempt: int) -> bool:
        """True if the abort landed mid-transfer (else the copy won, and all of it landed)."""
        refill(d.buf, dst, DECODE_SEED)  # the destination as it was
        await prefill.aio("fill", name="kv", blocks=src, seed=PREFILL_SEED)
        ticket = await prefill.aio("offer", name="kv", request_id=f"r{attempt}", blocks=src)
        seen: list[int] = []
        aborts: list[asyncio.Task[None]] = []

        def abort_at_first_layer(lo: int, hi: int) -> None:
            seen.append(lo)
            if len(seen) == 1:
                abort = prefill.aio("abort", ticket=ticket, name="kv", refill=src, seed=NEW_SEED)
                aborts.append(asyncio.create_task(abort))

        try:
            await d.h.fetch(ticket, d.cache, dst, on_layer=abort_at_first_layer)
            fetched = True
        except FetchError as exc:
            assert exc.partial_blocks == dst
            fetched = False
        await asyncio.gather(*aborts)
        record = await ends.wait_end(ticket)
        assert words_of_seed(d.buf, dst, NEW_SEED) == 0
        if fetched:  # the copy won: every layer landed before the abort came
            assert record["reason"] == "done"
            assert d.holds(dst, PREFILL_SEED, src)
            return False
        assert record["reason"] == "aborted", record
        landed, untouched = layers_landed(d.buf, dst, PREFILL_SEED, src, DECODE_SEED, n_layers)
        assert landed == seen  # each layer announced landed whole; no other was written
        assert len(landed) + len(untouched) == n_layers
        assert 1 <= len(seen) < n_layers  # the abort really came mid-transfer
        return True

    async with decode_engine(BIG) as d:
        tries = await retry_until(lambda attempt: one_try(d, attempt), "the abort mid-transfer")
        # later traffic on the same link still carries nothing of the reused blocks
        again = await prefill.aio("offer", name="kv", request_id="after", blocks=[5])
        await d.h.fetch(again, d.cache, [0])
        assert d.holds([0], PREFILL_SEED, [5])
        assert words_of_seed(d.buf, dst, NEW_SEED) == 0
        assert await prefill.aio("live") == 0
        await ends.poll()
        assert len(ends.records) == len({r["offer_id"] for r in ends.records}) == tries + 1


@pytest.mark.parametrize("how", ["abort", "cancel"])
async def test_decode_aborts_mid_transfer_and_reuses_its_blocks(make_peer, how):
    """The decode gives its fetch up while the prefill's copy runs (abort(ticket), or the
    fetch task cancelled), and refills the destination blocks the moment that returns: they
    keep the new pattern (nothing writes them later)."""
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill(layout=BIG)
    ends = Ends(prefill)
    src, dst = [0, 1, 2, 3], [4, 5, 6, 7]

    async def one_try(d: Decode, attempt: int) -> bool:
        refill(d.buf, dst, DECODE_SEED)
        ticket = await prefill.aio("offer", name="kv", request_id=f"r{attempt}", blocks=src)
        seen: list[int] = []
        fetch = asyncio.create_task(
            d.h.fetch(ticket, d.cache, dst, on_layer=lambda lo, hi: seen.append(lo))
        )
        await async_wait_until(lambda: seen or fetch.done(), 20, "a layer to land")
        assert seen, "no layer landed"
        layers_before = len(seen)
        if how == "abort":
            await d.h.abort(ticket)
        else:
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, FetchError):
                await fetch  # returns once the prefill confirmed it stopped writing
        refill(d.buf, dst, NEW_SEED)  # reused at once, for another request
        try:
            await fetch
            fetched = True
        except FetchError as exc:
            assert exc.partial_blocks == dst
            fetched = False
        except asyncio.CancelledError:
            fetched = False
        record = await ends.wait_end(ticket)
        if record["reason"] == "done":  # the copy won (a cancelled fetch gave it up anyway)
            assert fetched or how == "cancel"
            return False
        assert record["reason"] == "aborted" and not fetched, record
        assert layers_before < layers_of(BIG)  # the abort came mid-transfer
        return True

    async with decode_engine(BIG) as d:
        await retry_until(lambda attempt: one_try(d, attempt), "the abort mid-transfer")
        # another fetch on the same link goes through after it: anything of the aborted
        # copy still under way would have landed by now
        again = await prefill.aio("offer", name="kv", request_id="after", blocks=[5])
        await d.h.fetch(again, d.cache, [0])
        assert d.holds(dst, NEW_SEED, dst)  # the reused blocks kept the new pattern
        assert await prefill.aio("live") == 0
        assert d.eng.stats()["handoff"]["fetches_in_flight"] == 0


async def test_expired_lease_reported_once(make_peer):
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill()
    ends = Ends(prefill)
    async with decode_engine() as d:
        ticket = await prefill.aio(
            "offer", name="kv", request_id="never", blocks=[1, 2], lease_s=0.2
        )
        record = await ends.wait_end(ticket)  # nobody fetches
        assert (record["reason"], record["peer"]) == ("expired", None)
        assert await prefill.aio("live") == 0
        await prefill.aio("abort", ticket=ticket)  # too late: changes nothing
        with pytest.raises(FetchError) as err:
            await d.h.fetch(ticket, d.cache, [1, 2])
        assert err.value.status_code == S.LLM_KV_CACHE_NOT_EXIST
        assert d.untouched([1, 2])
        with pytest.raises(dxl.LLMException):
            await d.h.renew(ticket)
        # the request id is free again, and its new offer is a different one
        again = await prefill.aio("offer", name="kv", request_id="never", blocks=[1, 2])
        await d.h.fetch(again, d.cache, [1, 2])
        assert (await ends.wait_end(again))["reason"] == "done"
        assert [r["reason"] for r in await ends.poll()] == ["expired", "done"]


async def test_renewed_lease_outlives_its_period(make_peer):
    """The decode renews an offer while it is not ready; an offer made after it with the same
    lease, never renewed, expires first: the renewed one outlived a lease period."""
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill()
    ends = Ends(prefill)
    lease_s = 1.0
    async with decode_engine() as d:
        renewed = await prefill.aio(
            "offer", name="kv", request_id="kept", blocks=[4], lease_s=lease_s
        )
        control = await prefill.aio(
            "offer", name="kv", request_id="left", blocks=[5], lease_s=lease_s
        )
        renewals = 0
        while not ends.of(control):
            await d.h.renew(renewed)
            renewals += 1
            await ends.poll()
            await asyncio.sleep(lease_s / 10)  # the decode's renewal cadence, not a sync
        assert ends.of(control)[0]["reason"] == "expired"
        assert not ends.of(renewed) and renewals >= 2
        await d.h.fetch(renewed, d.cache, [9])
        assert d.holds([9], PREFILL_SEED, [4])
        assert (await ends.wait_end(renewed))["reason"] == "done"
        assert d.eng.stats()["handoff"]["renewals"] == renewals
        per_peer = (await prefill.aio("handoff_stats"))["per_peer"]
        assert per_peer[D_ID]["renewals"] == renewals


async def test_abort_after_the_end_changes_nothing(make_peer):
    """An abort that loses the race against the end (by ticket or by request id, on either
    side) is no error and ends nothing a second time."""
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill()
    ends = Ends(prefill)
    async with decode_engine() as d:
        ticket = await prefill.aio("offer", name="kv", request_id="r", blocks=[1])
        await d.h.fetch(ticket, d.cache, [2])
        assert (await ends.wait_end(ticket))["reason"] == "done"
        await prefill.aio("abort", ticket="r")  # by request id
        await prefill.aio("abort", ticket=ticket)
        await d.h.abort(ticket)
        # push mode: the decode offers, the prefill pushes and completes, then aborts come
        push = await d.h.offer_destination("p", d.cache, [3])
        await prefill.aio("push_layers", ticket=push.to_json(), name="kv", blocks=[4])
        await d.h.abort("p")  # by request id
        await d.h.abort(push)
        await prefill.aio("abort", ticket=push.to_json())
        [end] = d.h.poll_finished()
        assert (end.request_id, end.reason.value) == ("p", "done")
        assert d.holds([2], PREFILL_SEED, [1]) and d.holds([3], PREFILL_SEED, [4])
        assert len(await ends.poll()) == 1 and await prefill.aio("live") == 0


async def test_first_fetches_from_an_unlinked_prefill_share_its_link_setup(make_peer):
    """Fetches that start together towards a prefill this decode has no link to yet all wait
    for the one link setup (none fails because another is linking), and an abort of another
    offer of it, sent while that setup runs, reaches the prefill: that offer ends aborted."""
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill()
    ends = Ends(prefill)
    async with decode_engine() as d:
        tickets = [
            await prefill.aio("offer", name="kv", request_id=f"r{i}", blocks=[i]) for i in range(6)
        ]
        assert P_ID not in d.eng.stats()["links"]
        # gather starts the fetches in order, each runs to its link setup, then the abort
        results = await asyncio.gather(
            *(d.h.fetch(t, d.cache, [8 + i]) for i, t in enumerate(tickets[:5])),
            d.h.abort(tickets[5]),
            return_exceptions=True,
        )
        assert results == [None] * 6, results
        for i in range(5):
            assert d.holds([8 + i], PREFILL_SEED, [i])
        reasons = {r["request_id"]: r["reason"] for r in await ends.poll()}
        assert reasons == {**{f"r{i}": "done" for i in range(5)}, "r5": "aborted"}
        assert await prefill.aio("live") == 0
        assert len(d.eng.stats()["links"]) == 1


def hold_handshake(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold this process's link handshakes once our ready is sent (the peer then sets its side
    up): returns (reached, go_on); a held handshake goes on once ``go_on`` is set."""
    from dxl.engine import handshake

    reached, go_on = asyncio.Event(), asyncio.Event()
    original = handshake._data_info_then_ready

    async def held(*args: Any) -> Any:
        reached.set()
        await go_on.wait()
        return await original(*args)

    monkeypatch.setattr(handshake, "_data_info_then_ready", held)
    return reached, go_on


async def test_a_fetch_cancelled_while_it_links_leaves_the_link_for_the_abort(
    make_peer, monkeypatch
):
    """A decode request aborted while its fetch still links to the prefill (vLLM: the client
    went away right after the decode scheduled the load): the fetch is cancelled in the middle
    of the link handshake (the prefill is opening its transport), and the abort that releases
    the offer goes out next. The link setup the fetch began finishes; the abort uses it, and
    the offer ends aborted at once, not at its lease. (Cut short with the fetch, the prefill
    saw a link begun and dropped, refused the abort's own link while it still set that one up,
    and the release was lost.)"""
    waiting_for_ready, go_on = hold_handshake(monkeypatch)  # go on once the fetch is cancelled
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill()
    ends = Ends(prefill)
    async with decode_engine() as d:
        ticket = await prefill.aio(
            "offer", name="kv", request_id="r1", blocks=[2, 3], lease_s=3600.0
        )
        fetch = asyncio.ensure_future(d.h.fetch(ticket, d.cache, [4, 5]))
        await asyncio.wait_for(waiting_for_ready.wait(), 20)
        assert not fetch.done() and P_ID not in d.eng.stats()["links"]
        assert d.h.stats()["linking"] == 1
        fetch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fetch
        go_on.set()
        await d.h.abort(ticket)
        record = await ends.wait_end(ticket)
        assert record["reason"] == "aborted", record
        assert await prefill.aio("live") == 0
        assert d.untouched([4, 5])  # cancelled before it asked for a copy
        assert d.h.stats()["linking"] == 0


async def test_an_engine_closing_while_a_fetch_links_fails_the_fetch(make_peer, monkeypatch):
    """The decode engine closes while a fetch is still linking (the handshake held after our
    ready): the link setup stops and the fetch fails with LLM_LINK_FAILED, a FetchError, not a
    CancelledError its caller never asked for; the engine closes without waiting on it."""
    waiting_for_ready, _never = hold_handshake(monkeypatch)
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill()
    async with decode_engine() as d:
        ticket = await prefill.aio("offer", name="kv", request_id="r1", blocks=[2])
        fetch = asyncio.ensure_future(d.h.fetch(ticket, d.cache, [4]))
        await asyncio.wait_for(waiting_for_ready.wait(), 20)
        await asyncio.wait_for(d.eng.close(), 30)
        with pytest.raises(FetchError) as err:
            await fetch
        assert err.value.status_code == S.LLM_LINK_FAILED
        assert d.untouched([4])


async def test_a_fetch_waiting_for_a_slot_keeps_its_offer_alive(make_peer):
    """With ``max_fetches`` 1 and the slot held (the first fetch's on_layer waits), a second
    fetch waits for the slot renewing its offer's lease: a control offer with the same lease
    expires meanwhile, the waiting one does not, and is fetched once the slot frees."""
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill()
    ends = Ends(prefill)
    lease_s = 1.0  # a waiting fetch renews every third of it
    async with decode_engine() as d:
        d.h.max_fetches = 1
        first = await prefill.aio("offer", name="kv", request_id="first", blocks=[1])
        waiting = await prefill.aio(
            "offer", name="kv", request_id="waiting", blocks=[2], lease_s=lease_s
        )
        control = await prefill.aio(
            "offer", name="kv", request_id="control", blocks=[3], lease_s=lease_s
        )
        release = asyncio.Event()
        in_flight: list[int] = []

        async def hold_the_slot(lo: int, hi: int) -> None:
            in_flight.append(d.eng.stats()["handoff"]["fetches_in_flight"])
            await release.wait()

        holder = asyncio.create_task(d.h.fetch(first, d.cache, [8], on_layer=hold_the_slot))
        await async_wait_until(lambda: in_flight, 20, "the first fetch to hold the slot")
        second = asyncio.create_task(d.h.fetch(waiting, d.cache, [9]))
        assert (await ends.wait_end(control))["reason"] == "expired"
        assert not second.done() and not ends.of(waiting)  # waiting, and still offered
        assert d.eng.stats()["handoff"]["fetches_in_flight"] == 1
        release.set()
        await holder
        await second
        assert d.holds([8, 9], PREFILL_SEED, [1, 2])
        assert (await ends.wait_end(waiting))["reason"] == "done"
        assert d.eng.stats()["handoff"]["renewals"] >= 1
        assert max(in_flight) == 1


@pytest.mark.parametrize(
    "noticed_by",
    [
        "heartbeat",  # the link dies of silence first (200 ms heartbeats)
        "abort timeout",  # 30 s heartbeats: the abort's own deadline (5 s) cuts the link
    ],
)
async def test_a_prefill_that_never_confirms_an_abort_is_cut_off(make_peer, noticed_by):
    """The prefill stops (SIGSTOP) in the middle of its copy and the decode gives its fetch
    up: with no confirmation the decode closes the link (tcp: its data connections are
    revoked and fenced) before it returns, so the blocks it reuses at once keep the new
    pattern even after the prefill resumes and tries to go on writing."""
    heartbeat_ms = "200" if noticed_by == "heartbeat" else "30000"
    tcp = {"dxl.Transport": "tcp", "dxl.HeartbeatIntervalMs": heartbeat_ms}
    start_prefill = prefill_starter(make_peer)
    prefill = start_prefill(layout=BIG, options=tcp)
    ends = Ends(prefill)
    src, dst = [0, 1, 2, 3], [4, 5, 6, 7]

    async def one_try(d: Decode, attempt: int) -> bool:
        refill(d.buf, dst, DECODE_SEED)
        ticket = await prefill.aio("offer", name="kv", request_id=f"r{attempt}", blocks=src)
        seen: list[int] = []

        def stop_prefill_at_first_layer(lo: int, hi: int) -> None:
            seen.append(lo)
            if len(seen) == 1:
                prefill.kill(signal.SIGSTOP)

        fetch = asyncio.create_task(
            d.h.fetch(ticket, d.cache, dst, on_layer=stop_prefill_at_first_layer)
        )
        try:
            await async_wait_until(lambda: seen or fetch.done(), 20, "a layer to land")
            assert seen, "no layer landed"
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, FetchError):
                await fetch  # no confirmation comes: returns once the prefill is cut off
            refill(d.buf, dst, NEW_SEED)  # reused at once, for another request
            cut_off = P_ID not in d.eng.stats()["links"]
        finally:
            prefill.kill(signal.SIGCONT)
        record = await ends.wait_end(ticket)
        if record["reason"] == "done":  # the copy finished before the stop landed
            return False
        assert cut_off, "the decode kept its link to a prefill that never confirmed"
        # the prefill resumed and noticed: its copy is over, and none of it landed since
        await async_wait_until(
            lambda links: D_ID not in links,
            20,
            "the prefill drops the link",
            observe=lambda: prefill.aio("links"),
        )
        assert d.holds(dst, NEW_SEED, dst), (
            f"{words_of_seed(d.buf, dst, PREFILL_SEED)} words written after the decode returned"
        )
        return True

    async with decode_engine(BIG, options=tcp) as d:
        await retry_until(lambda attempt: one_try(d, attempt), "a stop mid-copy", tries=4)
        # the decode links again on its next fetch, and it goes through
        again = await prefill.aio("offer", name="kv", request_id="after", blocks=[5])
        await d.h.fetch(again, d.cache, [0])
        assert d.holds([0], PREFILL_SEED, [5])
        assert d.holds(dst, NEW_SEED, dst)
