"""The ``tcp`` transport's client: one link's data path to a peer's data server.

:class:`TcpTransport` moves a request as blocking ``read(pieces)`` (pull) or ``write(pieces)``
(push), the whole piece list in one native call (``dxl_tcp_transfer``) over a set of K parallel
streams (one stream for small requests). Streams that a failed or timed-out transfer left
mid-frame are closed at once and reopened (connect + handshake) at the next call; a stream is
never reused out of step. The peer's side is :class:`dxl.transport.tcp_server.DataServer`.

Instance id: the server sends a short id (the engine's incarnation) after the handshake; a
transport built with ``expect_instance`` refuses a server with another id, so a transport never
reconnects to a restarted peer whose memory layout it does not know.

Errors: the shim's failures come back as :class:`dxl._ffi.NativeError` with its C code; what
fails here in Python, before the shim is called (connecting, the handshake), raises
:class:`~dxl.transport.base.PeerGone`, :class:`~dxl.transport.base.TransferTimeout` or
:class:`~dxl.control.auth.AuthError`. :meth:`TcpTransport.failure` maps all of them to statuses.

Thread-safety: ``read``/``write`` may be called from several threads at once. Each call takes a
whole stream set from a small pool (up to ``max_sets`` sets, opened on demand; a call waits for a
free set when all are busy, within its timeout), so concurrent requests run in parallel on
separate connections and never share a stream.

Wire layout of the data streams, and the native API: ``native/dxl.h``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
import time

import numpy as np

from .. import _ffi
from ..control.auth import (
    AuthError,
    authenticate_sock_async,
    authenticate_socket,
    normalize_secret,
)
from ..memory.plan import Pieces
from ..types import Placement
from .base import Capabilities, PeerGone, TransferTimeout, Transport, TransportClosed
from .names import TCP

__all__ = [
    "DEFAULT_STREAMS",
    "DEFAULT_TIMEOUT_MS",
    "InstanceMismatch",
    "TcpTransport",
    "is_loopback",
]

DEFAULT_STREAMS = 4
DEFAULT_TIMEOUT_MS = 30_000
# Socket buffers: None leaves them to the kernel's autotuning, which grows them with the path's
# bandwidth-delay product up to net.ipv4.tcp_{r,w}mem. Setting SO_RCVBUF/SO_SNDBUF turns that off
# and is capped by net.core.{r,w}mem_max (often 208 KiB), which would throttle a long fat link;
# on loopback both measure the same (benchmarks/tcp_vs_raw_socket.py --sock-buf).
DEFAULT_SOCK_BUF: int | None = None
PURPOSE = "data"
MAX_INSTANCE = 255


def tune(sock: socket.socket, sock_buf: int | None) -> None:
    """Options of every data stream, on both ends."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sock_buf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sock_buf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sock_buf)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def encode_instance(instance: str) -> bytes:
    """The instance id as the server sends it after the handshake: a length byte, then UTF-8."""
    raw = instance.encode("utf-8")
    if len(raw) > MAX_INSTANCE:
        raise ValueError(f"instance id longer than {MAX_INSTANCE} bytes")
    return bytes((len(raw),)) + raw


class InstanceMismatch(PeerGone):
    """The data server is another instance than the one this transport was built for (the peer
    restarted): its registrations are unknown here, so nothing may be moved."""


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


class TcpTransport(Transport):
    """One link's data path to a peer's :class:`DataServer` (see the module docstring).

    Args:
        address: the peer data server's (host, port).
        secret: the shared secret (None or empty: none; the server must agree), or the link's
            key (with ``key_id``).
        key_id: names ``secret`` among the server's keys (the engine's per-link keys).
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
        PeerGone: cannot connect.
        TransferTimeout: connecting timed out.
    """

    name = TCP
    caps = Capabilities(
        same_host_only=False,
        maps_peer_memory=False,
        inline=False,  # a request waits on the network: never on the loop thread
        memory=frozenset({Placement.HOST}),
    )

    def __init__(
        self,
        address: tuple[str, int],
        secret: str | bytes | None,
        *,
        key_id: bytes = b"",
        streams: int = DEFAULT_STREAMS,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        connect_timeout_s: float = 10.0,
        max_sets: int = 4,
        expect_instance: str | None = None,
        sock_buf: int | None = DEFAULT_SOCK_BUF,
        first_streams: list[socket.socket] | None = None,  # from open_streams
    ) -> None:
        if not 1 <= streams <= _ffi.lib.DXL_TCP_MAX_STREAMS:
            raise ValueError(f"streams must be 1..{_ffi.lib.DXL_TCP_MAX_STREAMS}, not {streams}")
        if timeout_ms <= 0 or max_sets < 1:
            raise ValueError("timeout_ms and max_sets must be positive")
        self.address = (address[0], int(address[1]))
        self._secret = normalize_secret(secret)
        self._key_id = key_id
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
            if first_streams is not None:  # opened (and proven) already: see open_streams
                if len(first_streams) != streams:
                    raise ValueError(f"first_streams must hold {streams} sockets")
                for i, sock in enumerate(first_streams):
                    first.socks[i] = sock
                    first.fds[i] = sock.fileno()
                self.instance = expect_instance
            else:
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
        PeerGone, TransferTimeout."""
        host, port = self.address
        where = f"tcp data server {host}:{port}"
        # connect, handshake and instance id together within the connect timeout
        deadline = min(deadline, time.monotonic() + self._connect_timeout_s)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferTimeout(f"connect to {where}: timed out")
        try:
            sock = socket.create_connection((host, port), timeout=left)
        except TimeoutError as exc:
            raise TransferTimeout(f"connect to {where}: timed out") from exc
        except OSError as exc:
            raise PeerGone(f"connect to {where}: {exc.strerror or exc}") from exc
        try:
            tune(sock, self._sock_buf)
            left = deadline - time.monotonic()
            authenticate_socket(
                sock,
                self._secret,
                role="client",
                purpose=PURPOSE,
                timeout=max(left, 0.001),
                key_id=self._key_id,
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
                raise TransferTimeout(f"handshake with {where}: timed out")
            sock.settimeout(left)
            try:
                chunk = sock.recv(need - len(buf))
            except TimeoutError:
                continue
            except OSError as exc:
                raise PeerGone(f"handshake with {where}: {exc.strerror or exc}") from exc
            if not chunk:
                raise PeerGone(f"handshake with {where}: closed")
            buf += chunk
            if len(buf) == 1:
                need = 1 + buf[0]
        return buf[1:].decode("utf-8", "replace")

    def _fill(self, ss: _StreamSet, deadline: float, raw_errors: bool = False) -> None:
        """Open every missing stream of ``ss``. A refused handshake is an AuthError the first
        time (``raw_errors``: the link is being set up) and PeerGone on a reconnect (the peer
        changed under a live link)."""
        for i, sock in enumerate(ss.socks):
            if sock is not None:
                continue
            try:
                new = self._connect(deadline)
            except AuthError as exc:
                if raw_errors:
                    raise
                raise PeerGone(f"reconnect to tcp data server: {exc}") from exc
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
                    raise TransferTimeout(f"tcp: all {self._max_sets} stream sets stayed busy")
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


async def open_streams(
    address: tuple[str, int],
    secret: bytes | None,
    key_id: bytes,
    expect_instance: str,
    count: int,
    timeout_s: float,
    sock_buf: int | None = DEFAULT_SOCK_BUF,
) -> list[socket.socket]:
    """Open, authenticate and check ``count`` streams to a data server on the running loop,
    within ``timeout_s`` in all: no thread waits on a silent or slow server (a link being set up
    uses this; a live transport reconnects on its transfer thread). The mutual handshake with the
    link's key proves the server is the linked peer's. Returns blocking sockets for
    ``TcpTransport(first_streams=...)``.

    Raises:
        AuthError, InstanceMismatch, PeerGone, TransferTimeout.
    """
    loop = asyncio.get_running_loop()
    host, port = address
    where = f"tcp data server {host}:{port}"
    opened: list[socket.socket] = []

    async def one() -> None:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        opened.append(sock)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            raise PeerGone(f"connect to {where}: {exc.strerror or exc}") from exc
        tune(sock, sock_buf)
        await authenticate_sock_async(
            sock, secret, role="client", purpose=PURPOSE, timeout=timeout_s, key_id=key_id
        )
        head = await _recv_async(loop, sock, 1, where)
        instance = (await _recv_async(loop, sock, head[0], where)).decode("utf-8", "replace")
        if instance != expect_instance:
            raise InstanceMismatch(
                f"{where} is instance {instance!r}, not {expect_instance!r}: the peer restarted"
            )
        sock.setblocking(True)

    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(one() for _ in range(count)))
    except TimeoutError as exc:
        for sock in opened:
            sock.close()
        raise TransferTimeout(f"opening streams to {where}: timed out") from exc
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return opened


async def _recv_async(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int, where: str
) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            chunk = await loop.sock_recv(sock, n - len(buf))
        except OSError as exc:
            raise PeerGone(f"handshake with {where}: {exc.strerror or exc}") from exc
        if not chunk:
            raise PeerGone(f"handshake with {where}: closed")
        buf += chunk
    return buf
