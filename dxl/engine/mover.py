"""The mover: where every byte an engine moves, and every blocking native call, goes through.

It owns the engine's worker threads, decides when a small same-host request runs on the loop
thread instead (the inline policy), holds the link and caches a request touches in use until the
native call has returned, counts traffic, and turns a transport's failure into the status the
caller sees (closing the link when the peer is gone).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import DxlError, LLMException, LLMStatusCode, fail
from ..memory import localcopy
from ..memory.plan import Pieces
from ..transport import Job
from .executor import NativeExecutor
from .stats import OpStats
from .usage import Usage, hold

if TYPE_CHECKING:
    from .resolve import Route

log = logging.getLogger("dxl")
T = TypeVar("T")

INLINE_PER_TURN = 8  # inline copies per loop iteration: bounds the loop's stall to ~0.5 ms


class Mover:
    """Runs native calls and transfers for one engine (see the module docstring).

    Args:
        name: thread name prefix.
        threads: threads one request may split across (``dxl.TransferThreads``).
        inline_bytes: requests up to this size may run on the loop thread (``dxl.InlineBytes``).
        timeout_ms: ``sync_kv_timeout``, for messages.
    """

    def __init__(self, name: str, threads: int, inline_bytes: int, timeout_ms: int) -> None:
        self._name = name
        self.threads = threads
        self._inline_bytes = inline_bytes
        self._timeout_ms = timeout_ms
        self._executor: NativeExecutor | None = None
        self._inline_turns = 0  # inline copies in the current loop iteration
        self.pull = OpStats()
        self.push = OpStats()

    def start(self) -> None:
        self._executor = NativeExecutor(max(4, 2 * self.threads), self._name)

    def shutdown(self) -> None:
        """Finish queued calls and join the workers."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    async def run(
        self, fn: Callable[..., T], *args: Any, on_done: Callable[[], None] | None = None
    ) -> T:
        """Run a blocking call on the workers. Cancellation waits for the call to return
        before it propagates, so no native call still touches buffers the caller believes are
        free; ``on_done`` runs (on the loop) when the call has returned, whatever happens to
        the awaiting coroutine."""
        if self._executor is None:
            raise RuntimeError(f"{self._name}: the engine's workers are not running")
        fut = self._executor.submit(fn, *args)
        if on_done is not None:
            fut.add_done_callback(lambda _: on_done())
        cancelled = False
        while True:
            try:
                result = await asyncio.shield(fut)
                break
            except asyncio.CancelledError:
                if fut.done():
                    raise
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        return result

    async def run_jobs(self, jobs: Iterable[Job]) -> None:
        """Run background jobs one after another on the workers (so transfers interleave),
        until one returns False."""
        for job in jobs:
            if not await self.run(job):
                return

    async def transfer(
        self,
        op: str,
        route: Route,
        plan: Callable[[], Pieces],
        write: bool,
        nbytes_hint: int | None = None,
    ) -> None:
        """Plan (``plan()`` builds the pieces) and move one request over ``route``, holding the
        link and every cache it touches in use until the native call returned.

        A request of at most ``inline_bytes`` (``nbytes_hint``) over a transport that may copy
        inline runs on the loop thread: such a copy never waits on the peer and takes a few
        microseconds, less than the two thread wake-ups of the executor hop it saves."""
        link = route.link
        usages = [link.usage, route.local.usage, *(r.usage for r in route.remotes)]
        stats, link_stats = (self.push, link.push) if write else (self.pull, link.pull)
        transport = link.transport
        move = transport.write if write else transport.read

        def plan_and_move() -> tuple[int, int]:
            pieces = plan()
            try:
                return move(pieces), pieces.count
            finally:
                pieces.release()

        inline = (
            nbytes_hint is not None
            and nbytes_hint <= self._inline_bytes
            and transport.caps.inline
            and self._take_inline_turn()
        )
        release = hold(usages)  # released by the native call's end, not the awaiting coroutine
        t0 = time.perf_counter()
        try:
            if inline:
                try:
                    nbytes, count = plan_and_move()
                finally:
                    release()
            else:
                nbytes, count = await self.run(plan_and_move, on_done=release)
        except DxlError as exc:
            err = self._failed(op, route, exc)
            stats.record_error(err.status_code.name)
            link_stats.record_error(err.status_code.name)
            raise err from exc
        elapsed = time.perf_counter() - t0
        stats.record(nbytes, count, elapsed)
        link_stats.record(nbytes, count, elapsed)

    def _failed(self, op: str, route: Route, exc: DxlError) -> LLMException:
        """The caller's view of a transport failure; a dead peer ends its link, a timeout does
        not (the peer may only be slow)."""
        link = route.link
        failure = link.transport.failure(exc)
        who = f"cluster {link.peer.cluster_id}"
        if failure.peer_gone:
            who += f" (pid {link.peer.pid})"
            link.close(f"peer {link.peer.address} (pid {link.peer.pid}) is gone: {exc}")
        detail = f" ({self._timeout_ms} ms)" if failure.code == LLMStatusCode.LLM_TIMEOUT else ""
        return fail(op, failure.code, f"{who} {failure.what}{detail}: {exc}")

    async def copy_local(self, pieces: Pieces, usages: list[Usage]) -> None:
        """One native copy within this process, holding the caches until it returned."""
        release = hold(usages)
        await self.run(localcopy.run_pieces, pieces, self.threads, on_done=release)

    def _take_inline_turn(self) -> bool:
        """At most INLINE_PER_TURN inline copies per loop iteration, so a burst of small
        requests started together cannot hold the loop (the rest use the workers)."""
        if self._inline_turns == 0:
            asyncio.get_running_loop().call_soon(self._reset_inline_turns)
        if self._inline_turns >= INLINE_PER_TURN:
            return False
        self._inline_turns += 1
        return True

    def _reset_inline_turns(self) -> None:
        self._inline_turns = 0

    def snapshot(self) -> dict[str, Any]:
        return {"pull": self.pull.snapshot(), "push": self.push.snapshot()}
