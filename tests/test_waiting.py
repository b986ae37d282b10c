"""The test helpers that replace sleeps: they return what they waited for, and on expiry fail
naming what was awaited and what was last seen."""

from __future__ import annotations

import asyncio
import threading

import pytest
from waiting import WaitTimeout, async_wait_until, start_until_in_flight, wait_until


def test_returns_the_value_that_satisfied_the_predicate() -> None:
    seen = iter([0, 0, 3])
    assert wait_until(lambda: next(seen), 5, "a non-zero value") == 3
    values = iter([[1], [1], []])
    assert wait_until(lambda v: v == [], 5, "an empty list", observe=lambda: next(values)) == []


def test_sees_a_change_made_by_another_thread() -> None:
    flag = threading.Event()
    threading.Thread(target=flag.set).start()
    assert wait_until(flag.is_set, 10, "the flag set by the thread")


def test_expiry_names_what_and_the_last_value() -> None:
    counter = iter(range(1_000_000))
    with pytest.raises(
        WaitTimeout,
        match=r"waiting for the counter to go negative; last "
        r"observed: \d+",
    ) as err:
        wait_until(
            lambda c: c < 0, 0.05, "the counter to go negative", observe=lambda: next(counter)
        )
    assert isinstance(err.value, AssertionError)  # a test failure, not an error
    with pytest.raises(WaitTimeout, match=r"waiting for nothing at all; last observed: False"):
        wait_until(lambda: False, 0.0, "nothing at all")  # polled once even with no time left


async def test_async_waits_let_the_loop_run_and_take_awaitables() -> None:
    done = asyncio.Event()
    asyncio.get_running_loop().call_soon(done.set)  # runs only if the wait yields to the loop
    assert await async_wait_until(done.is_set, 10, "the callback to run")

    async def links() -> list[int]:
        await asyncio.sleep(0)
        return [1, 2]

    assert await async_wait_until(lambda v: 2 in v, 10, "link 2", observe=links) == [1, 2]
    with pytest.raises(WaitTimeout, match=r"waiting for link 3; last observed: \[1, 2\]"):
        await async_wait_until(lambda v: 3 in v, 0.05, "link 3", observe=links)


async def test_a_race_is_retried_until_work_is_seen_in_flight() -> None:
    tries: list[asyncio.Event] = []

    async def work(gate: asyncio.Event) -> None:
        if len(tries) > 1:  # the first try finishes before anyone looks
            await gate.wait()

    def start() -> list[asyncio.Task[None]]:
        tries.append(asyncio.Event())
        return [asyncio.create_task(work(tries[-1]))]

    [task] = await start_until_in_flight(start, "the work", in_flight=lambda: len(tries) > 1)
    assert len(tries) == 2 and not task.done()  # returned while it still runs
    tries[-1].set()
    await task


async def test_a_race_never_hit_fails_naming_it() -> None:
    starts: list[int] = []

    def start() -> list[asyncio.Task[None]]:
        starts.append(1)
        return [asyncio.create_task(asyncio.sleep(0))]

    with pytest.raises(WaitTimeout, match=r"a no-op finished before it was seen in flight, 3 "):
        await start_until_in_flight(start, "a no-op", in_flight=lambda: False, tries=3)
    assert len(starts) == 3
