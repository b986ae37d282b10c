"""The cap on fetches in flight: first come, first served, and a limit that changes while
fetches wait (a serving framework lowers or raises ``max_fetches`` as its load changes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from waiting import async_wait_until

import dxl
from dxl.handoff import Ended, Ticket
from dxl.handoff.slots import Slots
from dxl.testing import KVBuffers

TENSORS, BLOCKS, BB = 2, 8, 256


async def settle() -> None:
    """Let every task that can run, run (no timing: the loop steps until nobody is ready)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def holders(slots: Slots, n: int) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(slots.acquire()) for _ in range(n)]
    await settle()
    return tasks


async def test_waiters_are_served_in_arrival_order() -> None:
    slots = Slots(1)
    await slots.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await slots.acquire()
        order.append(i)

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await settle()
    assert order == [] and slots.held == 1
    for expected in ([0], [0, 1], [0, 1, 2]):
        slots.release()
        await settle()
        assert order == expected
    await asyncio.gather(*tasks)


async def test_raising_the_limit_wakes_as_many_waiters_as_it_frees() -> None:
    slots = Slots(0)  # 0 holds everyone
    tasks = await holders(slots, 3)
    assert not any(t.done() for t in tasks)
    slots.limit = 2
    await settle()
    assert [t.done() for t in tasks] == [True, True, False]
    assert slots.held == 2
    slots.limit = 3
    await settle()
    assert all(t.done() for t in tasks) and slots.held == 3


async def test_lowering_the_limit_takes_effect_as_holders_leave() -> None:
    slots = Slots(3)
    await holders(slots, 3)
    slots.limit = 1
    [late] = await holders(slots, 1)
    for _ in range(2):
        slots.release()
        await settle()
        assert not late.done()  # still 1 or 2 held, the limit is 1
    slots.release()
    await settle()
    assert late.done() and slots.held == 1


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    slots = Slots(1)
    await slots.acquire()
    first, second = await holders(slots, 2)
    first.cancel()
    await settle()
    assert first.cancelled()
    slots.release()
    await settle()
    assert second.done() and slots.held == 1


async def test_a_waiter_cancelled_as_it_is_woken_passes_the_slot_on() -> None:
    slots = Slots(1)
    await slots.acquire()
    first, second = await holders(slots, 2)
    slots.release()  # first is woken (counted as holder) ...
    first.cancel()  # ... and cancelled before it ran
    await settle()
    assert first.cancelled() and second.done() and slots.held == 1


# ---------------------------------------------------------------------- on an engine
async def _engine(cluster_id: int, seed: int, fill: bool):
    eng = dxl.Engine(cluster_id, dxl.LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:0"})
    await eng.start()
    kv = KVBuffers(TENSORS, BLOCKS, BB, seed=seed, fill=fill)
    cache = await eng.register_blocks_cache(kv.desc(), kv.addrs, remote_accessible=True)
    return eng, kv, cache


@pytest.fixture
async def pair() -> AsyncIterator[tuple]:
    p, pkv, pcache = await _engine(111, seed=7, fill=True)
    d, dkv, dcache = await _engine(112, seed=0, fill=False)
    try:
        yield p, pkv, pcache, d, dkv, dcache
    finally:
        await d.close()
        await p.close()


async def test_max_fetches_changed_after_the_first_fetch_applies_to_waiting_fetches(pair) -> None:
    p, _, pcache, d, dkv, dcache = pair
    first = await p.handoff.offer("r0", pcache, [0])
    await d.handoff.fetch(Ticket.of(first.to_dict()), dcache, [0])  # the slots are in use now
    d.handoff.max_fetches = 0
    t = await p.handoff.offer("r1", pcache, [1, 2], lease_s=1.0)
    fetch = asyncio.create_task(d.handoff.fetch(Ticket.of(t.to_dict()), dcache, [5, 6]))
    # it waits for a slot, renewing its offer's lease: still live past several lease periods
    await async_wait_until(
        lambda n: n >= 4,  # 4 renewals a third of a lease apart: past the lease's own end
        30,
        "the waiting fetch renews its offer",
        observe=lambda: d.handoff.stats()["renewals"],
    )
    assert not fetch.done() and p.handoff.live() == 1
    d.handoff.max_fetches = 1
    await asyncio.wait_for(fetch, 30)
    assert dkv.matches(range(TENSORS), [5, 6], 7, range(TENSORS), [1, 2])
    ends = {e.request_id: e.reason for e in p.handoff.poll_finished()}
    assert ends == {"r0": Ended.DONE, "r1": Ended.DONE}


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), ("2", TypeError), (2.0, TypeError)])
async def test_max_fetches_refuses_what_is_not_a_count(pair, value, error) -> None:
    d = pair[3]
    before = d.handoff.max_fetches
    with pytest.raises(error, match="max_fetches"):
        d.handoff.max_fetches = value
    assert d.handoff.max_fetches == before
