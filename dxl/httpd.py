"""A tiny HTTP/1.1 endpoint for GET requests that a stranger may reach (the handoff's metrics).

One request per connection, answered and closed. Everything a client can hold or make us log is
bounded:

- a **whole-request deadline** (``deadline_s``): the request line, the headers and writing the
  answer together, however slowly the bytes trickle in (a client sending one header line every
  second is cut at the deadline like a silent one, answered ``408`` where it still listens);
- at most ``max_connections`` connections at once: one more is answered ``503`` and closed at
  once, so a crowd of idle clients holds at most that many file descriptors past its accept;
- a request line of at most ``MAX_LINE`` bytes (else ``414``), header lines of at most
  ``MAX_LINE`` bytes each and ``MAX_HEADER_BYTES`` / ``MAX_HEADERS`` in all (else ``431``),
  anything that is not ``METHOD TARGET HTTP/x`` ``400``;
- client errors are answered, never logged as errors (no traceback; a debug line). Only the
  handler failing is logged, once per failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

__all__ = ["MAX_HEADERS", "MAX_HEADER_BYTES", "MAX_LINE", "Endpoint", "Handler", "start"]

log = logging.getLogger("dxl")

MAX_LINE = 8192  # the request line, and each header line
MAX_HEADER_BYTES = 16384  # all header lines together
MAX_HEADERS = 64
DEADLINE_S = 5.0
MAX_CONNECTIONS = 32
LINGER_BYTES = 65536  # after an error answer, read (and drop) at most this much of the request
LINGER_S = 1.0

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

# (method, path without the query) -> (status, content type, body)
Handler = Callable[[str, str], tuple[int, str, bytes]]


class _RequestError(Exception):
    """The client's request is refused with ``status``."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class _Gone(Exception):
    """The client closed before sending a whole request: nothing to answer."""


def response(status: int, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _plain(status: int, why: str) -> bytes:
    return response(status, "text/plain; charset=utf-8", f"{why}\n".encode())


async def _line(reader: asyncio.StreamReader, too_long: int, what: str) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _RequestError(too_long, f"{what} over {MAX_LINE} bytes") from None
    except asyncio.IncompleteReadError:
        raise _Gone from None


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The request's method and path (query dropped); its headers are read and ignored.

    Raises:
        _RequestError: malformed or over a bound.
        _Gone: the client closed first.
    """
    parts = (await _line(reader, 414, "request line")).decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _RequestError(400, "expected METHOD TARGET HTTP/version")
    total = count = 0
    while (header := await _line(reader, 431, "header line")) not in (b"\r\n", b"\n"):
        total += len(header)
        count += 1
        if total > MAX_HEADER_BYTES or count > MAX_HEADERS:
            why = f"headers over {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} lines"
            raise _RequestError(431, why)
    return parts[0], parts[1].split("?", 1)[0]


class Endpoint:
    """The per-connection callback of :func:`start`; ``live`` is the connections it holds now,
    ``refused`` how many it turned away at the cap."""

    def __init__(self, handler: Handler, deadline_s: float, max_connections: int) -> None:
        self._handler = handler
        self._deadline_s = deadline_s
        self._max = max_connections
        self.live = 0
        self.refused = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.live >= self._max:
            self.refused += 1
            writer.write(_plain(503, "too many connections"))
            writer.transport.abort()  # not close(): a client that never reads must not hold it
            return
        self.live += 1
        # drain() then waits until every byte went to the kernel: after it the socket can close
        writer.transport.set_write_buffer_limits(high=0)
        answered = False
        try:
            async with asyncio.timeout(self._deadline_s):
                answer, refused = await self._answer(reader)
                writer.write(answer)
                answered = True
                await writer.drain()
                if refused:
                    await _linger(reader, writer)
        except TimeoutError:
            if not answered:
                writer.write(_plain(408, f"the request took over {self._deadline_s:g} s"))
        except (_Gone, OSError):  # the client went (reset, broken pipe): nobody to answer
            pass
        finally:
            self.live -= 1
            # abort: whatever is still buffered goes to a client too slow to take it by the
            # deadline, so dropping it holds nothing (a finished answer is with the kernel)
            writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        """The response to the request, and whether it refuses the request (unread bytes of
        it may follow)."""
        try:
            method, path = await read_request(reader)
        except _RequestError as exc:
            log.debug("dxl: http: refused a request with %d: %s", exc.status, exc)
            return _plain(exc.status, str(exc)), True
        try:
            status, content_type, body = self._handler(method, path)
        except Exception:
            log.exception("dxl: http: answering %s %s failed", method, path)
            status, content_type, body = 500, "text/plain", b"internal error\n"
        return response(status, content_type, body), False


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read (and drop) what the client is still sending, briefly: closing a
    socket with unread bytes resets the connection, and the reset can destroy the error
    answer before the client read it."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_S):
            dropped = 0
            while dropped < LINGER_BYTES and (chunk := await reader.read(MAX_LINE)):
                dropped += len(chunk)


async def start(
    handler: Handler,
    host: str,
    port: int,
    *,
    deadline_s: float = DEADLINE_S,
    max_connections: int = MAX_CONNECTIONS,
) -> asyncio.Server:
    """Serve ``handler`` on ``host:port`` (port 0: any free one) on the running loop.

    Raises:
        ValueError: ``deadline_s`` not positive or ``max_connections`` under 1.
        OSError: cannot listen.
    """
    if not deadline_s > 0:
        raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
    endpoint = Endpoint(handler, deadline_s, max_connections)
    return await asyncio.start_server(endpoint, host, port, limit=MAX_LINE)
