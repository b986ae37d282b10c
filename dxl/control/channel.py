"""One control connection between two engines: framing, requests with acks, heartbeats.

A :class:`Channel` owns an asyncio stream pair. It reads frames in one task and hands each
decoded message to a handler; ``request()`` sends a message carrying a request id and awaits the
matching ``ack``. A heartbeat task sends ``ping`` every interval, and silence for
``HEARTBEAT_MISSES`` of the *peer's* intervals (each side announces its own in the handshake)
closes the channel, so a stopped or vanished peer is noticed even when no transfer is running.
Any malformed frame closes this channel only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

from ..errors import LLMException, LLMStatusCode
from ..guard import RateLimitedLog
from . import wire
from .messages import Ack, Message, Ping, Probe, Request

log = logging.getLogger("dxl")
limited = RateLimitedLog(log)

HEARTBEAT_MISSES = 3

Handler = Callable[["Channel", Message], Awaitable[None]]


async def read_message(reader: asyncio.StreamReader, max_frame: int = wire.MAX_FRAME) -> Message:
    """Read one frame of at most ``max_frame`` bytes and decode it (raises FrameError,
    IncompleteReadError)."""
    header = await reader.readexactly(wire.HEADER.size)
    body = await reader.readexactly(wire.frame_length(header, max_frame))
    return wire.decode(body)


class Channel:
    """A live control connection to one peer engine."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        name: str,
        heartbeat_s: float,
        peer_heartbeat_s: float | None = None,
    ) -> None:
        self.name = name
        self._reader = reader
        self._writer = writer
        self._heartbeat_s = heartbeat_s
        # the peer pings at its own interval: silence is judged by the slower of the two
        self._silence_s = HEARTBEAT_MISSES * max(heartbeat_s, peer_heartbeat_s or heartbeat_s)
        self._rids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[Ack]] = {}
        self._last_rx = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()
        self.close_reason = ""

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def start(self, handler: Handler, on_close: Callable[[Channel], None]) -> None:
        """Start reading (dispatching non-ack messages to ``handler``) and heartbeating."""
        self._on_close = on_close
        self._tasks = [
            asyncio.create_task(self._read_loop(handler), name=f"dxl-read-{self.name}"),
            asyncio.create_task(self._heartbeat_loop(), name=f"dxl-beat-{self.name}"),
        ]

    def send(self, msg: Message) -> None:
        """Queue one message; a closed channel drops it (its waiters already failed)."""
        if self.closed:
            return
        self._writer.write(wire.encode(msg))

    async def drain(self) -> None:
        """Wait until queued frames are handed to the kernel (best effort)."""
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    async def request(self, msg: Request, timeout_s: float) -> Ack:
        """Send a request under a fresh request id (its ``rid`` is filled in here) and wait for
        its ack (LLMException on failure)."""
        kind = msg.KIND
        if self.closed:
            raise LLMException(
                f"link {self.name} is closed: {self.close_reason}",
                status_code=LLMStatusCode.LLM_NOT_YET_LINK,
            )
        rid = next(self._rids)
        try:
            frame = wire.encode(dataclasses.replace(msg, rid=rid))
        except wire.FrameError as exc:  # the caller's fields (e.g. a ticket's) break the schema
            raise LLMException(
                f"{kind} to {self.name}: {exc}", status_code=LLMStatusCode.LLM_PARAM_INVALID
            ) from None
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        try:
            if not self.closed:
                self._writer.write(frame)
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            raise LLMException(
                f"{kind} to {self.name} got no answer within {timeout_s * 1000:.0f} ms",
                status_code=LLMStatusCode.LLM_TIMEOUT,
            ) from None
        finally:
            self._waiters.pop(rid, None)

    def ack(self, rid: int, code: int = 0, message: str = "") -> None:
        self.send(Ack(rid=rid, code=int(code), message=wire.clip(message)))

    async def _read_loop(self, handler: Handler) -> None:
        reason = "peer closed the connection"
        try:
            while True:
                try:
                    msg = await read_message(self._reader)
                except wire.FieldError as exc:  # one bad request: it fails, the link stays
                    self._last_rx = time.monotonic()
                    self._refuse(exc)
                    continue
                self._last_rx = time.monotonic()
                if isinstance(msg, Ack):
                    fut = self._waiters.get(msg.rid)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif isinstance(msg, Probe):  # liveness: answered here, whatever the owner does
                    self.ack(msg.rid)
                elif not isinstance(msg, Ping):
                    await handler(self, msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except wire.FrameError as exc:
            reason = f"malformed frame from peer: {exc}"
            log.warning("dxl: closing link %s: %s", self.name, reason)
        except asyncio.CancelledError:
            reason = "closed locally"
        except Exception as exc:  # a handler bug must not take the engine down
            reason = f"internal error: {exc!r}"
            log.exception("dxl: closing link %s after a handler error", self.name)
        self.close(reason)

    def _refuse(self, exc: wire.FieldError) -> None:
        limited.warning(
            "bad-request", "dxl: refused a malformed %s from link %s: %s", exc.kind, self.name, exc
        )
        self.ack(exc.rid, int(LLMStatusCode.LLM_PARAM_INVALID), f"malformed {exc.kind}: {exc}")

    async def _heartbeat_loop(self) -> None:
        try:
            while not self.closed:
                await asyncio.sleep(self._heartbeat_s)
                silent = time.monotonic() - self._last_rx
                if silent > self._silence_s:
                    self.close(f"peer silent for {silent * 1000:.0f} ms (heartbeat)")
                    return
                self.send(Ping())
        except asyncio.CancelledError:
            pass

    def close(self, reason: str) -> None:
        """Close the connection, fail every waiter, and tell the owner once."""
        if self.closed:
            return
        self.close_reason = reason
        self._closed.set()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(
                    LLMException(
                        f"link {self.name} closed: {reason}",
                        status_code=LLMStatusCode.LLM_LINK_FAILED,
                    )
                )
        self._waiters.clear()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        with contextlib.suppress(Exception):
            self._writer.close()
        self._on_close(self)

    async def wait_closed(self) -> None:
        """Wait for the reader/heartbeat tasks and the socket to finish."""
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
