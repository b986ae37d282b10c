"""A cap on fetches in flight whose limit may change while fetches wait (an asyncio.Semaphore's
cannot: a serving framework lowers or raises ``max_fetches`` as its load changes)."""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    """At most ``limit`` holders; waiters are served first come, first served. Raising the
    limit wakes as many waiters as it frees slots; lowering it takes effect as holders leave
    (no holder is pre-empted). A limit of 0 holds every newcomer until it is raised."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        self._limit = value
        self._wake()

    @property
    def held(self) -> int:
        return self._held

    def full(self) -> bool:
        return self._held >= self._limit or bool(self._waiters)

    async def acquire(self) -> None:
        if not self.full():
            self._held += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # _wake() counted us as a holder before resolving it
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # woken and cancelled in the same step: pass the slot on
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self._held -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._held < self._limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._held += 1
                fut.set_result(None)
