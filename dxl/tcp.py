"""The ``tcp`` transport: a native data server per engine, and a client transport per link.

:class:`DataServer` listens on a TCP port (asyncio). Each new connection runs the
:mod:`dxl.auth` handshake (purpose ``"data"``) with a timeout and then receives the server's
instance id (see below); then its file descriptor is handed to the native data server
(``dxl_tcp_server_adopt``), which serves reads and writes of registered memory only, on its own
threads, until the connection closes. A connection that fails the handshake, or sends garbage,
is closed; nothing else is affected.

:class:`TcpTransport` is one link's data path to a peer's :class:`DataServer`: blocking
``read(pieces)`` (pull) and ``write(pieces)`` (push), like :class:`dxl.transport.CmaTransport`.
Each call moves the whole piece list in one native call (``dxl_tcp_transfer``) over a set of K
parallel streams (one stream for small requests). Streams that a failed or timed-out transfer
left mid-frame are closed at once and reopened (connect + handshake) at the next call; a stream is
never reused out of step.

Instance id: the server sends a short id (the engine's incarnation) after the handshake; a
transport built with ``expect_instance`` refuses a server with another id, so a transport never
reconnects to a restarted peer whose memory layout it does not know.

Thread-safety: ``read``/``write`` may be called from several threads at once. Each call takes a
whole stream set from a small pool (up to ``max_sets`` sets, opened on demand; a call waits for a
free set when all are busy, within its timeout), so concurrent requests run in parallel on
separate connections and never share a stream.

Wire layout of the data streams, and the native API: ``native/dxl.h``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import ipaddress
import logging
import os
import socket
import threading
import time
from typing import Any

import numpy as np

from . import _ffi
from .auth import AuthError, authenticate_sock_async, authenticate_socket, normalize_secret
from .plan import Pieces
from .transport import TransportClosed

__all__ = [
    "DEFAULT_STREAMS",
    "DEFAULT_TIMEOUT_MS",
    "DataServer",
    "InstanceMismatch",
    "TcpTransport",
]

log = logging.getLogger("dxl")

DEFAULT_STREAMS = 4
DEFAULT_TIMEOUT_MS = 30_000
# Socket buffers: None leaves them to the kernel's autotuning, which grows them with the path's
# bandwidth-delay product up to net.ipv4.tcp_{r,w}mem. Setting SO_RCVBUF/SO_SNDBUF turns that off
# and is capped by net.core.{r,w}mem_max (often 208 KiB), which would throttle a long fat link;
# on loopback both measure the same (benchmarks/tcp_vs_raw_socket.py --sock-buf).
DEFAULT_SOCK_BUF: int | None = None
PURPOSE = "data"
_MAX_INSTANCE = 255


def _tune(sock: socket.socket, sock_buf: int | None) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sock_buf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sock_buf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sock_buf)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _encode_instance(instance: str) -> bytes:
    raw = instance.encode("utf-8")
    if len(raw) > _MAX_INSTANCE:
        raise ValueError(f"instance id longer than {_MAX_INSTANCE} bytes")
    return bytes((len(raw),)) + raw


class InstanceMismatch(_ffi.NativeError):
    """The data server is another instance than the one this transport was built for (the peer
    restarted): its registrations are unknown here, so nothing may be moved. Code DXL_E_PEER."""

    def __init__(self, what: str, errno: int = 0) -> None:
        super().__init__(_ffi.lib.DXL_E_PEER, what, errno)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.what, self.errno))


# ------------------------------------------------------------------------------------------------
# server


class DataServer:
    """An engine's native data server and the asyncio listener that feeds it.

    Create with ``await DataServer.start(...)``; stop with ``await close()``.
    """

    def __init__(self) -> None:  # use start()
        self._native: Any = None
        self._lsock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._secret: bytes | None = None
        self._instance = b"\0"
        self._auth_timeout = 10.0
        self._sock_buf: int | None = None
        self._max_pending = 128
        self.address: tuple[str, int] = ("", 0)
        self.instance = ""
        self.auth_failures = 0

    def __repr__(self) -> str:
        return f"DataServer(address={self.address!r}, secret={'set' if self._secret else 'none'})"

    @classmethod
    async def start(
        cls,
        host: str,
        port: int,
        secret: str | bytes | None,
        *,
        instance: str = "",
        threads: int = 2,
        auth_timeout: float = 10.0,
        sock_buf: int | None = DEFAULT_SOCK_BUF,
        allow_insecure: bool = False,
        backlog: int = 128,
    ) -> DataServer:
        """Listen on ``host:port`` (port 0: any free port, see :attr:`address`) and start the
        native server with ``threads`` threads.

        Args:
            secret: the shared secret; None or empty: no authentication (both ends must agree).
            instance: the id sent to every client after the handshake (the engine's incarnation).
            auth_timeout: seconds a new connection has to complete the handshake.
            sock_buf: SO_SNDBUF/SO_RCVBUF of accepted connections (None: kernel autotuning).
            allow_insecure: listen without a secret on a non-loopback address. Without it that is
                refused with ValueError: anyone who can reach the port could read and write every
                remotely-accessible registration.

        Raises:
            ValueError: no secret on a non-loopback address without ``allow_insecure``.
            OSError: cannot listen.
            NativeError: the native server would not start.
        """
        self = cls()
        self._secret = normalize_secret(secret)
        if self._secret is None and not allow_insecure and not _is_loopback(host):
            raise ValueError(
                f"refusing to serve data on {host!r} without a shared secret: set one, listen "
                "on a loopback address, or allow this explicitly"
            )
        self._instance = _encode_instance(instance)
        self.instance = instance
        self._auth_timeout = auth_timeout
        self._sock_buf = sock_buf
        out = _ffi.ffi.new("dxl_tcp_server_t **")
        _ffi.check(_ffi.lib.dxl_tcp_server_start(threads, out), "start tcp data server")
        self._native = out[0]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, sockaddr = infos[0]
            lsock = socket.socket(family, socket.SOCK_STREAM)
            try:
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind(sockaddr)
                lsock.listen(backlog)
                lsock.setblocking(False)
            except BaseException:
                lsock.close()
                raise
            self._lsock = lsock
            self.address = tuple(lsock.getsockname()[:2])  # type: ignore[assignment]
            self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        except BaseException:
            await self.close()
            raise
        log.info("dxl: tcp data server on %s:%d", *self.address)
        return self

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._lsock is not None
        while True:
            try:
                conn, peer = await loop.sock_accept(self._lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if exc.errno in (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM):
                    log.warning("dxl: tcp data server cannot accept: %s", exc)
                    await asyncio.sleep(0.1)
                    continue
                if self._lsock is None or self._lsock.fileno() < 0:
                    return
                log.warning("dxl: tcp data server accept failed: %s", exc)
                await asyncio.sleep(0.01)
                continue
            if len(self._pending) >= self._max_pending:
                log.warning(
                    "dxl: tcp data server: too many handshakes in progress, refusing %s", peer
                )
                conn.close()
                continue
            task = loop.create_task(self._admit(conn, peer))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _admit(self, conn: socket.socket, peer: Any) -> None:
        """Handshake, instance id, then hand the socket to the native server."""
        try:
            conn.setblocking(False)
            _tune(conn, self._sock_buf)
            await authenticate_sock_async(
                conn, self._secret, role="server", purpose=PURPOSE, timeout=self._auth_timeout
            )
            await asyncio.get_running_loop().sock_sendall(conn, self._instance)
        except asyncio.CancelledError:
            conn.close()
            raise
        except (AuthError, OSError) as exc:
            self.auth_failures += 1
            log.warning("dxl: tcp data server refused a connection from %s: %s", peer, exc)
            conn.close()
            return
        if self._native is None:
            conn.close()
            return
        fd = conn.detach()
        rc = _ffi.lib.dxl_tcp_server_adopt(self._native, fd)
        if rc < 0:
            err = _ffi.lib.dxl_last_errno()
            os.close(fd)
            log.warning(
                "dxl: tcp data server could not adopt a connection from %s: %s",
                peer,
                _ffi.NativeError(rc, "adopt", err),
            )

    def stats(self) -> dict[str, int]:
        """The native server's counters (see ``dxl_tcp_server_stats_t``), plus handshake
        failures."""
        out = _ffi.ffi.new("dxl_tcp_server_stats_t *")
        if self._native is not None:
            _ffi.lib.dxl_tcp_server_stats(self._native, out)
        fields = (
            "conns_adopted",
            "conns_live",
            "conns_dropped",
            "requests_served",
            "requests_rejected",
            "bytes_sent",
            "bytes_received",
            "requests_aborted",
        )
        result = {name: int(getattr(out, name)) for name in fields}
        result["auth_failures"] = self.auth_failures
        return result

    def fence(self, timeout_ms: int) -> int:
        """Blocking: wait until no request that was touching memory when called still does
        (requests still running after ``timeout_ms`` have their connections closed). Call after
        ``dxl_region_remove`` and before the memory may be freed; run it on an executor.
        Returns how many connections were cut off."""
        if self._native is None:
            return 0
        out = _ffi.ffi.new("uint64_t *")
        _ffi.check(_ffi.lib.dxl_tcp_server_fence(self._native, timeout_ms, out), "tcp fence")
        return int(out[0])

    async def close(self) -> None:
        """Stop accepting, drop handshakes in progress, stop the native server (its threads are
        joined and every adopted connection is closed)."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        for task in list(self._pending):
            task.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
        native, self._native = self._native, None
        if native is not None:
            _ffi.lib.dxl_tcp_server_stop(native)


# ------------------------------------------------------------------------------------------------
# client


class _StreamSet:
    """K sockets to one data server; slot i is None once closed for being out of step."""

    def __init__(self, k: int) -> None:
        self.socks: list[socket.socket | None] = [None] * k
        self.fds = _ffi.ffi.new("int[]", k)

    def missing(self) -> bool:
        return any(s is None for s in self.socks)

    def drop(self, mask: int) -> None:
        for i, sock in enumerate(self.socks):
            if sock is not None and mask >> i & 1:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                self.socks[i] = None
                self.fds[i] = -1

    def drop_stale(self) -> None:
        """Close idle streams with anything to read: the server closed them (EOF) or they are out
        of step. An idle stream in step has nothing pending."""
        for i, sock in enumerate(self.socks):
            if sock is None:
                continue
            try:
                sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue  # nothing pending: in step
            except OSError:
                pass
            self.drop(1 << i)  # EOF, stray bytes or an error

    def close(self) -> None:
        self.drop((1 << len(self.socks)) - 1)


class TcpTransport:
    """One link's data path to a peer's :class:`DataServer` (see the module docstring).

    Args:
        address: the peer data server's (host, port).
        secret: the shared secret (None or empty: none; the server must agree).
        streams: K, parallel streams per request (1..64); requests under
            ``dxl_tcp_stream_threshold()`` bytes per stream use fewer.
        timeout_ms: bound on each read/write call, reconnects and waiting for a free stream set
            included.
        connect_timeout_s: bound on opening and authenticating one stream.
        max_sets: most stream sets open at once (concurrent calls beyond it wait).
        expect_instance: the server's instance id (the peer's incarnation), or None to accept any.
        sock_buf: SO_SNDBUF/SO_RCVBUF per stream (None: kernel autotuning).

    The first stream set is opened here, so a wrong address, secret or instance fails at once.

    Raises:
        AuthError: the handshake failed (the message says which side refused what).
        InstanceMismatch: the server is another instance than ``expect_instance``.
        NativeError: cannot connect (DXL_E_PEER with the errno) or timed out (DXL_E_TIMEDOUT).
    """

    name = "tcp"

    def __init__(
        self,
        address: tuple[str, int],
        secret: str | bytes | None,
        *,
        streams: int = DEFAULT_STREAMS,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        connect_timeout_s: float = 10.0,
        max_sets: int = 4,
        expect_instance: str | None = None,
        sock_buf: int | None = DEFAULT_SOCK_BUF,
    ) -> None:
        if not 1 <= streams <= _ffi.lib.DXL_TCP_MAX_STREAMS:
            raise ValueError(f"streams must be 1..{_ffi.lib.DXL_TCP_MAX_STREAMS}, not {streams}")
        if timeout_ms <= 0 or max_sets < 1:
            raise ValueError("timeout_ms and max_sets must be positive")
        self.address = (address[0], int(address[1]))
        self._secret = normalize_secret(secret)
        self._streams = streams
        self._timeout_ms = timeout_ms
        self._connect_timeout_s = connect_timeout_s
        self._max_sets = max_sets
        self._expect = expect_instance
        self._sock_buf = sock_buf
        self._cond = threading.Condition()
        self._idle: list[_StreamSet] = []
        self._nsets = 0
        self._closed = False
        self.reconnects = 0
        self.instance: str | None = None
        first = _StreamSet(streams)
        try:
            self._fill(first, time.monotonic() + timeout_ms / 1000, raw_errors=True)
        except BaseException:
            first.close()
            raise
        self._idle.append(first)
        self._nsets = 1

    def __repr__(self) -> str:
        return f"TcpTransport(address={self.address!r}, streams={self._streams})"

    # -- connections

    def _connect(self, deadline: float) -> socket.socket:
        """One stream: connect, handshake, instance id. Raises AuthError, InstanceMismatch,
        NativeError (DXL_E_PEER / DXL_E_TIMEDOUT)."""
        host, port = self.address
        where = f"tcp data server {host}:{port}"
        left = min(deadline - time.monotonic(), self._connect_timeout_s)
        if left <= 0:
            raise _ffi.NativeError(_ffi.lib.DXL_E_TIMEDOUT, f"connect to {where}", _errno.ETIMEDOUT)
        try:
            sock = socket.create_connection((host, port), timeout=left)
        except TimeoutError:
            raise _ffi.NativeError(
                _ffi.lib.DXL_E_TIMEDOUT, f"connect to {where}", _errno.ETIMEDOUT
            ) from None
        except OSError as exc:
            raise _ffi.NativeError(
                _ffi.lib.DXL_E_PEER, f"connect to {where}", exc.errno or 0
            ) from None
        try:
            _tune(sock, self._sock_buf)
            left = min(deadline - time.monotonic(), self._connect_timeout_s)
            authenticate_socket(
                sock, self._secret, role="client", purpose=PURPOSE, timeout=max(left, 0.001)
            )
            instance = self._read_instance(sock, deadline, where)
        except BaseException:
            sock.close()
            raise
        if self._expect is not None and instance != self._expect:
            sock.close()
            raise InstanceMismatch(
                f"{where} is instance {instance!r}, not {self._expect!r}: the peer restarted "
                "and must be linked again"
            )
        self.instance = instance
        sock.settimeout(None)
        return sock

    def _read_instance(self, sock: socket.socket, deadline: float, where: str) -> str:
        buf = b""
        need = 1
        while len(buf) < need:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _ffi.NativeError(
                    _ffi.lib.DXL_E_TIMEDOUT, f"handshake with {where}", _errno.ETIMEDOUT
                )
            sock.settimeout(left)
            try:
                chunk = sock.recv(need - len(buf))
            except TimeoutError:
                continue
            except OSError as exc:
                raise _ffi.NativeError(
                    _ffi.lib.DXL_E_PEER, f"handshake with {where}", exc.errno or 0
                ) from None
            if not chunk:
                raise _ffi.NativeError(_ffi.lib.DXL_E_PEER, f"handshake with {where}: closed")
            buf += chunk
            if len(buf) == 1:
                need = 1 + buf[0]
        return buf[1:].decode("utf-8", "replace")

    def _fill(self, ss: _StreamSet, deadline: float, raw_errors: bool = False) -> None:
        """Open every missing stream of ``ss``. Errors other than NativeError become NativeError
        (DXL_E_PEER) unless ``raw_errors``."""
        for i, sock in enumerate(ss.socks):
            if sock is not None:
                continue
            try:
                new = self._connect(deadline)
            except AuthError as exc:
                if raw_errors:
                    raise
                raise _ffi.NativeError(
                    _ffi.lib.DXL_E_PEER, f"reconnect to tcp data server: {exc}"
                ) from None
            ss.socks[i] = new
            ss.fds[i] = new.fileno()

    def _acquire(self, deadline: float) -> _StreamSet:
        with self._cond:
            while True:
                if self._closed:
                    raise TransportClosed("tcp transport is closed")
                if self._idle:
                    ss = self._idle.pop()
                    break
                if self._nsets < self._max_sets:
                    self._nsets += 1
                    ss = _StreamSet(self._streams)
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _ffi.NativeError(
                        _ffi.lib.DXL_E_TIMEDOUT,
                        f"tcp: all {self._max_sets} stream sets stayed busy",
                        _errno.ETIMEDOUT,
                    )
                self._cond.wait(left)
        try:
            ss.drop_stale()
            if ss.missing():
                self.reconnects += sum(s is None for s in ss.socks)
                self._fill(ss, deadline)
        except BaseException:
            self._release(ss, discard=True)
            raise
        return ss

    def _release(self, ss: _StreamSet, discard: bool = False) -> None:
        with self._cond:
            if self._closed or discard:
                ss.close()
                self._nsets -= 1
            else:
                self._idle.append(ss)
            self._cond.notify()

    # -- transfers

    def read(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        """Pull: ``pieces.src`` (the peer's memory) -> ``pieces.dst`` (ours). Bytes moved."""
        return self._move(0, pieces.dst, pieces.src, pieces, timeout_ms)

    def write(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        """Push: ``pieces.src`` (ours) -> ``pieces.dst`` (the peer's memory). Bytes moved."""
        return self._move(1, pieces.src, pieces.dst, pieces, timeout_ms)

    def _move(
        self,
        write: int,
        local: np.ndarray,
        remote: np.ndarray,
        pieces: Pieces,
        timeout_ms: int | None,
    ) -> int:
        if self._closed:
            raise TransportClosed("tcp transport is closed")
        if pieces.count == 0:
            return 0
        timeout_ms = self._timeout_ms if timeout_ms is None else timeout_ms
        start = time.monotonic()
        deadline = start + timeout_ms / 1000
        what = "tcp push" if write else "tcp pull"
        what = f"{what} {'to' if write else 'from'} {self.address[0]}:{self.address[1]}"
        # Checked here so a bad array raises before a stream set is taken.
        if local.size < pieces.count or remote.size < pieces.count:
            raise ValueError("piece address arrays are shorter than the length array")
        local_p = _ffi.as_u64_ptr(local)
        remote_p = _ffi.as_u64_ptr(remote)
        len_p = _ffi.as_u64_ptr(pieces.length)
        ss = self._acquire(deadline)
        result = _ffi.ffi.new("dxl_tcp_result_t *")
        left_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            rc = _ffi.lib.dxl_tcp_transfer(
                ss.fds,
                self._streams,
                write,
                local_p,
                remote_p,
                len_p,
                pieces.count,
                left_ms,
                result,
            )
            err = _ffi.lib.dxl_last_errno()
            if result.broken_mask:
                ss.drop(int(result.broken_mask))
        except BaseException:
            self._release(ss, discard=True)
            raise
        self._release(ss)
        if rc < 0:
            if rc == _ffi.lib.DXL_E_REMOTE:
                status = int(result.remote_status)
                what += f": the server refused it with {_ffi.err_name(status)}"
                if status == _ffi.lib.DXL_E_RANGE:
                    what += f" (piece {int(result.remote_detail)} is not registered there)"
            exc = _ffi.NativeError(rc, what, err)
            exc.remote_status = int(result.remote_status)  # type: ignore[attr-defined]
            raise exc
        return int(result.bytes_done)

    def close(self) -> None:
        """Close every idle stream set now; sets in use close when their call returns."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._nsets -= len(idle)
            self._cond.notify_all()
        for ss in idle:
            ss.close()
