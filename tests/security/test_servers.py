"""The two other ports a stranger can reach, the tcp data port and the metrics HTTP endpoint, are
bounded like the control port: refusals are rate-limited in the log, and the HTTP endpoint cuts
slow requests at a whole-request deadline, holds at most a fixed number of connections and
answers oversized requests with a 4xx, without a traceback.

Everything runs in this process on loopback (the log and the server's sockets are what is
measured). Deadlines in waits are generous bounds, never measured durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from typing import Any

import pytest
from waiting import async_wait_until

from dxl.guard import RateLimitedLog
from dxl.handoff import metrics
from dxl.memory.regions import RegionRegistry
from dxl.transport.tcp_server import DataServer

pytest.importorskip(
    "prometheus_client",
    reason="metrics.serve() needs the metrics extra (pip install 'dxl[metrics]'); the dev "
    "extra installs it",
)

GARBAGE_CONNECTIONS = 200
HTTP_CAP = 8
HTTP_CLIENTS = 300


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "dxl" and r.levelno >= logging.WARNING]


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):  # a server that reset it
        await writer.wait_closed()


async def _garbage(address: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(b"garbage" * 20)  # not the auth handshake
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 30)  # the server closes it
    finally:
        await _close(writer)


async def test_data_port_refusals_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dxl")
    regions = RegionRegistry()
    srv = await DataServer.start("127.0.0.1", 0, None, registry=regions)
    # one window for the whole flood, however slowly a loaded machine runs it: the count of
    # lines is then the burst, not the burst times the windows the flood happened to span
    srv._warn = RateLimitedLog(logging.getLogger("dxl"), period=3600)
    try:
        for _ in range(GARBAGE_CONNECTIONS // 20):
            await asyncio.gather(*(_garbage(srv.address) for _ in range(20)))
        await async_wait_until(
            lambda: srv.auth_failures == GARBAGE_CONNECTIONS,
            30,
            "every garbage connection refused",
        )
    finally:
        await srv.close()  # reports the suppressed count
        regions.close()
    lines = _warnings(caplog)
    refused = [r for r in lines if "refused a connection" in r.getMessage()]
    summaries = [
        int(m.group(1))
        for r in lines
        if (m := re.match(r"dxl: (\d+) more refused-data message", r.getMessage()))
    ]
    assert len(lines) <= 10, f"{len(lines)} warnings for {GARBAGE_CONNECTIONS} refusals"
    assert refused and summaries, [r.getMessage() for r in lines]
    assert len(refused) + sum(summaries) == GARBAGE_CONNECTIONS  # nothing lost, only counted


@contextlib.asynccontextmanager
async def metrics_server(**limits: Any):
    server = await metrics.serve([], **limits)  # no engines: empty families are enough here
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        await _close(writer)


def _server_fds(port: int) -> int:
    """Sockets this process holds whose local port is ``port`` and that are not listening: the
    connections the HTTP server accepted and still holds (clients' sockets have it as remote
    port)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                ours.add(link[8:-1])
    held = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] != "0A" and fields[9] in ours:  # 0A: LISTEN
                    held += 1
    return held


async def test_metrics_slowloris_is_cut_at_the_deadline() -> None:
    async with metrics_server(deadline_s=1.0) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        await writer.drain()

        async def dribble() -> None:
            """One header line every 100 ms, as long as the server takes them (at most 60 s:
            far past the deadline)."""
            with contextlib.suppress(ConnectionError):
                for n in range(600):
                    writer.write(f"X-Slow-{n}: 1\r\n".encode())
                    await writer.drain()
                    await asyncio.sleep(0.1)

        dribbler = asyncio.create_task(dribble())
        try:
            with contextlib.suppress(ConnectionError):
                answer = await asyncio.wait_for(reader.read(), 30)  # EOF: the server closed it
                assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
            assert not dribbler.done()  # it was still sending when the server cut it
        finally:
            dribbler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dribbler
            await _close(writer)
        # the endpoint still answers
        assert (await _request(port, b"GET /metrics.json HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 200"
        )


async def test_metrics_connection_cap_holds() -> None:
    async with metrics_server(deadline_s=120.0, max_connections=HTTP_CAP) as port:
        clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        turned_away: list[asyncio.Task[bytes]] = []
        most = 0
        try:
            for batch in range(HTTP_CLIENTS // 20):
                for _ in range(20):
                    clients.append(await asyncio.open_connection("127.0.0.1", port))
                    turned_away.append(asyncio.create_task(clients[-1][0].read()))
                # settled: every client past the cap has its 503 and EOF
                await async_wait_until(
                    lambda n=(batch + 1) * 20: sum(t.done() for t in turned_away) >= n - HTTP_CAP,
                    30,
                    "connections over the cap answered",
                )
                most = max(most, _server_fds(port))
            assert most <= HTTP_CAP, f"the server held {most} connections (cap {HTTP_CAP})"
            answers = [t.result() for t in turned_away if t.done()]
            assert len(answers) == HTTP_CLIENTS - HTTP_CAP
            assert all(a.startswith(b"HTTP/1.1 503") for a in answers), answers[:3]
        finally:
            for t in turned_away:
                t.cancel()
            await asyncio.gather(*(_close(writer) for _, writer in clients))
        # the idle clients went: a real request is served again
        await async_wait_until(lambda: _server_fds(port) == 0, 30, "the held connections closed")
        answer = await _request(port, b"GET /metrics.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"b" * (70 * 1024) + b"\r\n\r\n", b"431"),
        (b"GET /metrics HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 5000 + b"\r\n", b"431"),
        (b"NONSENSE\r\n\r\n", b"400"),
    ],
    ids=["request-line", "header-line", "many-headers", "malformed"],
)
async def test_metrics_oversized_request_gets_a_4xx_and_no_traceback(
    caplog: pytest.LogCaptureFixture, raw: bytes, status: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    async with metrics_server() as port:
        answer = await _request(port, raw)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
        # and the endpoint is still there
        ok = await _request(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200"), ok[:80]
    errors = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_metrics_refusal_then_deadline_answers_once(caplog: pytest.LogCaptureFixture) -> None:
    """A client that sends an oversized request and then stays: the 414 is its one answer, the
    deadline then only closes the connection (no second answer, nothing logged as an error)."""
    caplog.set_level(logging.DEBUG)
    async with metrics_server(deadline_s=0.5) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /" + b"a" * (9 * 1024))  # no end of line, and it stays
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 30)  # EOF: the server half-closed
            # the server waits a little for the rest of the request, then its deadline passes
            await async_wait_until(lambda: _server_fds(port) == 0, 30, "the server closed it")
        finally:
            await _close(writer)
    assert answer.startswith(b"HTTP/1.1 414") and answer.count(b"HTTP/1.1") == 1, answer[:80]
    errors = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
