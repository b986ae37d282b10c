"""The mover: where every byte an engine moves, and every blocking native call, goes through.

It owns the engine's worker threads, decides when a small same-host request runs on the loop
thread instead (the inline policy), holds the link and caches a request touches in use until the
native call has returned, counts traffic, and turns a transport's failure into the status the
caller sees (closing the link when the peer is gone). A request arrives as a value
(:class:`~dxl.engine.transfer.Transfer`: operation, route, direction, pieces, deadline); the
mover plans its pieces on the thread that copies and moves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import DxlError, LLMStatusCode, fail
from ..memory import localcopy
from ..memory.plan import Pieces
from ..transport import Job
from .executor import NativeExecutor
from .stats import OpStats
from .usage import Usage, hold

if TYPE_CHECKING:
    from .transfer import Transfer

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

    async def move(self, transfer: Transfer) -> None:
        """Plan (on the thread that copies) and move one request, holding the link and every
        cache it touches in use until the native call returned.

        A request marked ``inline`` of at most ``inline_bytes`` over a transport that may copy
        inline runs on the loop thread: such a copy never waits on the peer and takes a few
        microseconds, less than the two thread wake-ups of the executor hop it saves."""
        route = transfer.route
        link = route.link
        usages = [link.usage, route.local.usage, *(r.usage for r in route.remotes)]
        write = transfer.write
        stats, link_stats = (self.push, link.push) if write else (self.pull, link.pull)
        transport = link.transport
        copy = transport.write if write else transport.read

        by_index = transfer.by_index() if transport.caps.block_index else None

        def plan_and_move() -> tuple[int, int]:
            if by_index is not None:  # lists prepared per cache: no plan
                moved = transport.move_blocks(by_index, write, transfer.timeout_ms)
                if moved is not None:
                    return moved, int(by_index.local_blocks.size * by_index.local_bases.size)
            pieces = transfer.pieces.plan()
            try:
                return copy(pieces, transfer.timeout_ms), pieces.count
            finally:
                pieces.release()

        inline = (
            transfer.inline
            and transport.caps.inline
            and transfer.pieces.nbytes <= self._inline_bytes
            and self._take_inline_turn()
        )
        release = hold(usages)  # released by the native call's end, not the awaiting coroutine
        t0 = time.perf_counter()
        with self._failures(transfer, stats, link_stats):
            if inline:
                try:
                    nbytes, count = plan_and_move()
                finally:
                    release()
            else:
                nbytes, count = await self.run(plan_and_move, on_done=release)
        elapsed = time.perf_counter() - t0
        stats.record(nbytes, count, elapsed)
        link_stats.record(nbytes, count, elapsed)

    @contextlib.contextmanager
    def _failures(self, transfer: Transfer, *stats: OpStats) -> Iterator[None]:
        """Map a transport's failure (``DxlError``) to the caller's ``LLMException``, with the
        context only the transfer has: its operation, its peer, its deadline (as httpcore's
        ``map_exceptions``). A dead peer ends its link, a timeout does not (the peer may only be
        slow)."""
        try:
            yield
        except DxlError as exc:
            link = transfer.route.link
            failure = link.transport.failure(exc)
            who = f"cluster {link.peer.cluster_id}"
            if failure.peer_gone:
                who += f" (pid {link.peer.pid})"
                link.close(f"peer {link.peer.address} (pid {link.peer.pid}) is gone: {exc}")
            timeout_ms = self._timeout_ms if transfer.timeout_ms is None else transfer.timeout_ms
            detail = f" ({timeout_ms} ms)" if failure.code == LLMStatusCode.LLM_TIMEOUT else ""
            for counter in stats:
                counter.record_error(failure.code.name)
            raise fail(transfer.op, failure.code, f"{who} {failure.what}{detail}: {exc}") from exc

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
