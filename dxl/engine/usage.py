"""Counting users of a region so that unregistering can wait until nobody touches it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Usage:
    """In-flight transfer count of one cache, with a bounded wait for it to drop to zero.

    Only touched from the engine's event loop, so no lock is needed.
    """

    __slots__ = ("_count", "_idle")

    def __init__(self) -> None:
        self._count = 0
        self._idle: asyncio.Event | None = None

    @property
    def count(self) -> int:
        return self._count

    def acquire(self) -> None:
        self._count += 1

    def release(self) -> None:
        self._count -= 1
        if self._count == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no transfer uses the region; False if the wait timed out."""
        if self._count == 0:
            return True
        if self._idle is None or self._idle.is_set():
            self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return self._count == 0
        return True


def hold(usages: list[Usage]) -> Callable[[], None]:
    """Acquire every usage now; the returned function releases them all (call it once, when
    the native call that touches the memory has returned)."""
    for usage in usages:
        usage.acquire()

    def release() -> None:
        for usage in usages:
            usage.release()

    return release
