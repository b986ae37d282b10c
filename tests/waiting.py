"""Waiting for an observable effect, with a deadline, instead of sleeping a guessed time.

``wait_until(predicate, deadline_s, what)`` polls ``predicate()`` (short sleeps, doubling from
``first_s`` up to ``max_s``) until it returns something truthy, and returns that. If the
deadline passes first it fails the test with an AssertionError naming ``what`` and the last
value observed. ``observe`` splits the two: ``observe()`` is what is looked at (and reported),
``predicate(value)`` decides, and the value observed is returned; e.g. ``wait_until(lambda
links: 1 not in links, 5, "link 1 dropped", observe=lambda: eng.stats()["links"])`` reports the
links it last saw.

``await async_wait_until(...)`` is the same for coroutines: it sleeps with ``asyncio.sleep``,
so the event loop (and the engine on it) keeps running while it waits, and ``observe`` or
``predicate`` may also return an awaitable (e.g. ``peer.acall("links")``).

A deadline is a bound on a wait that should end far sooner, not a measured duration: pick it
generous (seconds), so that a loaded machine only makes the test slower, never failing.

Races: ``await start_until_in_flight(start, what)`` starts work until a native transfer is seen
in flight (``ops_inflight()`` > 0) while it still runs, retrying when it finished first, and
fails when that never happens; a test that kills, stops, cancels or unlinks "mid-transfer"
uses it so that the race it exists for is really hit.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

FIRST_S = 0.0005
MAX_S = 0.05
_UNSEEN = object()


class WaitTimeout(AssertionError):
    """The awaited condition did not hold before the deadline."""


def _expired(what: str, deadline_s: float, value: Any) -> WaitTimeout:
    seen = "nothing (never polled)" if value is _UNSEEN else repr(value)
    return WaitTimeout(
        f"timed out after {deadline_s:g} s waiting for {what}; last observed: {seen}"
    )


def wait_until(
    predicate: Callable[..., Any],
    deadline_s: float,
    what: str,
    *,
    observe: Callable[[], Any] | None = None,
    first_s: float = FIRST_S,
    max_s: float = MAX_S,
) -> Any:
    """Poll until ``predicate()`` (or ``predicate(observe())``) is truthy; return the value that
    satisfied it (the observed value when ``observe`` is given). Raises WaitTimeout."""
    deadline = time.monotonic() + deadline_s
    delay = first_s
    value: Any = _UNSEEN
    while True:
        expired = time.monotonic() >= deadline  # read before polling: the last poll counts
        if observe is None:
            value = result = predicate()
        else:
            value = observe()
            result = predicate(value)
        if result:
            return value if observe is not None else result
        if expired:
            raise _expired(what, deadline_s, value)
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, max_s)


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def async_wait_until(
    predicate: Callable[..., Any],
    deadline_s: float,
    what: str,
    *,
    observe: Callable[[], Any] | None = None,
    first_s: float = FIRST_S,
    max_s: float = MAX_S,
) -> Any:
    """``wait_until`` for coroutines: the loop keeps running between polls; ``observe`` and
    ``predicate`` may return awaitables. Raises WaitTimeout."""
    deadline = time.monotonic() + deadline_s
    delay = first_s
    value: Any = _UNSEEN
    while True:
        expired = time.monotonic() >= deadline
        if observe is None:
            value = result = await _resolve(predicate())
        else:
            value = await _resolve(observe())
            result = await _resolve(predicate(value))
        if result:
            return value if observe is not None else result
        if expired:
            raise _expired(what, deadline_s, value)
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, max_s)


def ops_inflight() -> int:
    """Native transfers (cma, memcpy, tcp) running in this process now: dxl_counters_t's
    ops_inflight, the observable sign that a transfer has really started and not yet ended."""
    from dxl import _ffi

    return _ffi.counters()["ops_inflight"]


async def start_until_in_flight(
    start: Callable[[], list[asyncio.Task[Any]]],
    what: str,
    *,
    in_flight: Callable[[], Any] = ops_inflight,
    tries: int = 20,
    deadline_s: float = 30.0,
) -> list[asyncio.Task[Any]]:
    """Set up a race: ``start()`` starts work and returns its tasks; return them once
    ``in_flight()`` is seen while they still run (e.g. a native copy under way), so that what
    the test does next (kill the peer, cancel, unlink...) really lands mid-transfer.

    A try whose tasks all finish before that is seen is awaited (its errors propagate) and
    started again; after ``tries`` the test fails: the race it exists for was never hit."""
    for _ in range(tries):
        tasks = start()

        def seen(tasks: list[asyncio.Task[Any]] = tasks) -> str | None:
            if all(t.done() for t in tasks):
                return "finished"
            return "in flight" if in_flight() else None

        outcome = await async_wait_until(
            seen, deadline_s, f"{what} to be in flight or finish", first_s=0.0002, max_s=0.001
        )
        if outcome == "in flight":
            return tasks
        await asyncio.gather(*tasks)
    raise WaitTimeout(
        f"{what} finished before it was seen in flight, {tries} times: the race this test "
        "needs was never hit"
    )
