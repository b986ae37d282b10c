"""What keeps a stranger from growing our resources at will: handshakes in progress are capped
(the oldest is shed, so a flood of silent connections cannot lock real peers out), and the
warnings a stranger can trigger (refused connections, malformed frames) are rate-limited."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


class PendingCap:
    """At most ``cap`` handshakes in progress: admitting one more cancels the oldest (it has had
    the longest to complete; a real peer completes in milliseconds)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._tasks: OrderedDict[asyncio.Task[Any], None] = OrderedDict()
        self.shed = 0  # handshakes cancelled to make room

    def __len__(self) -> int:
        return len(self._tasks)

    def admit(self, task: asyncio.Task[Any]) -> None:
        while len(self._tasks) >= self.cap:
            oldest, _ = self._tasks.popitem(last=False)
            oldest.cancel()
            self.shed += 1
        self._tasks[task] = None
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(task, None)

    def cancel_all(self) -> list[asyncio.Task[Any]]:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks


@dataclass(slots=True)
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0


class RateLimitedLog:
    """At most ``burst`` messages per kind every ``period`` seconds; the rest are counted and
    reported in one line when the next window opens."""

    def __init__(self, logger: logging.Logger, period: float = 10.0, burst: int = 5) -> None:
        self._log = logger
        self._period = period
        self._burst = burst
        self._windows: dict[str, _Window] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        self._emit(logging.WARNING, kind, message, *args)

    def error(self, kind: str, message: str, *args: object) -> None:
        self._emit(logging.ERROR, kind, message, *args)

    def _emit(self, level: int, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        window = self._windows.get(kind)
        if window is None or now - window.start >= self._period:
            if window is not None:
                self._summarize(kind, window)
            window = self._windows[kind] = _Window(now)
        if window.logged < self._burst:
            window.logged += 1
            self._log.log(level, message, *args)
        else:
            window.suppressed += 1

    def flush(self) -> None:
        """Report every count not reported yet, now (the owner is closing: no next window will
        report them)."""
        for kind, window in self._windows.items():
            self._summarize(kind, window)
            window.suppressed = 0

    def _summarize(self, kind: str, window: _Window) -> None:
        if window.suppressed:
            self._log.warning(
                "dxl: %d more %s message(s) suppressed in %.0f s",
                window.suppressed,
                kind,
                self._period,
            )
