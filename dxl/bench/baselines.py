"""Baselines measured in the same run as dxl: the ceilings a transfer is compared against.

- ``memcpy``: the same piece lists copied between two local caches of the same layout by the
  shim's ``dxl_copy_pieces`` (the pool that splits a piece list into contiguous byte ranges,
  as dxl's own copies do), with one thread (the historical ``ratio``) and with as many threads
  as one dxl request may use (``LLMConfig.transfer_threads``): the latter is the *limit* of the
  same-host transports (cma, cma+shm), what the machine's memory can do with the same
  parallelism.
- ``raw_socket``: TCP connections (over loopback, or the veth of ``--netns``) between the
  target and the initiator, tuned as the tcp transport tunes its streams; per request the
  initiator sends each stream a 17-byte header and each stream's part of the request moves as
  one ``sendall`` / ``recv_into(MSG_WAITALL)`` between two contiguous buffers, all inside
  CPython's C socket code (the GIL is released), one thread per stream. With one stream it is
  the historical ``ratio``'s baseline; with as many streams as the tcp transport opens for a
  request of that size (:func:`tcp_streams`) it is the *limit* of ``tcp`` (iperf-style: no
  piece list, no scatter, no protocol).

Both run one request at a time, as ``--concurrency 1`` runs dxl; with more requests in flight dxl
may use more threads or streams than the limit does, and a ratio above 1 can be that.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import _ffi
from ..config import DEFAULT_TRANSFER_THREADS
from ..memory.plan import Pieces, block_pieces
from ..transport.tcp import DEFAULT_SOCK_BUF, DEFAULT_STREAMS, tune

# op (0 pull: target sends; 1 push: target receives), offset into the buffers, bytes
_HEADER = struct.Struct("<BQQ")
_PULL, _PUSH = 0, 1
_CUT_ALIGN = 4096  # the tcp transport cuts a request into per-stream parts on 4 KiB bounds
MAX_RAW_CONNECTIONS = 64  # the server's connection threads; more are refused (closed)


def copy_threads(transfer_threads: int | None) -> int:
    """Threads one dxl request's copy may use: ``LLMConfig.transfer_threads`` (or its
    default when the bench leaves it to the engine)."""
    return transfer_threads if transfer_threads is not None else DEFAULT_TRANSFER_THREADS


def tcp_streams(nbytes: int) -> int:
    """Streams the tcp transport moves a request of ``nbytes`` over: ``DEFAULT_STREAMS`` per
    link, one per ``dxl_tcp_stream_threshold()`` bytes, at least one (dxl_tcp_client.c)."""
    per_stream = int(_ffi.lib.dxl_tcp_stream_threshold(0))
    return max(1, min(DEFAULT_STREAMS, nbytes // per_stream))


def plan_requests(
    dst_addrs: list[int], src_addrs: list[int], tables: list[np.ndarray], block_bytes: int
) -> list[Pieces]:
    """The piece list of each request (block b of every tensor to block b), planned by dxl."""
    dst = np.asarray(dst_addrs, dtype=np.uint64)
    src = np.asarray(src_addrs, dtype=np.uint64)
    return [block_pieces(dst, src, t, t, block_bytes) for t in tables]


def memcpy_requests(plans: list[Pieces], threads: int = 1) -> tuple[float, list[float]]:
    """Copy each planned request with up to ``threads`` threads (the shim's pool);
    ``(wall seconds, per-request seconds)``."""
    lib, ptr = _ffi.lib, _ffi.as_u64_ptr
    lat = []
    t0 = time.perf_counter()
    for p in plans:
        t1 = time.perf_counter()
        _ffi.check(
            lib.dxl_copy_pieces(ptr(p.dst), ptr(p.src), ptr(p.length), p.count, threads), "memcpy"
        )
        lat.append(time.perf_counter() - t1)
    return time.perf_counter() - t0, lat


def cut(nbytes: int, parts: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each stream's contiguous part of ``nbytes`` (4 KiB aligned cuts,
    as the tcp transport cuts a request); parts that would be empty are left out."""
    step = -(-nbytes // parts)
    step = -(-step // _CUT_ALIGN) * _CUT_ALIGN
    return [(off, min(step, nbytes - off)) for off in range(0, nbytes, step)]


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    pos, n = 0, len(view)
    while pos < n:
        got = sock.recv_into(view[pos:], n - pos, socket.MSG_WAITALL)
        if not got:
            raise ConnectionError("raw socket baseline: peer closed the connection")
        pos += got


class RawSocketServer:
    """The target's end on ``host`` (where its dxl engine listens): a thread per connection
    (at most ``MAX_RAW_CONNECTIONS``), all over one buffer of ``max_bytes`` (streams of one
    request read or write disjoint parts of it)."""

    def __init__(self, max_bytes: int, host: str = "127.0.0.1") -> None:
        self._max = max_bytes
        self._buf: np.ndarray | None = None
        self._lock = threading.Lock()
        self._conns = threading.BoundedSemaphore(MAX_RAW_CONNECTIONS)
        self._lsock = socket.create_server((host, 0))
        self.port: int = self._lsock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="raw-socket", daemon=True)
        self._thread.start()

    def _view(self) -> memoryview:
        with self._lock:  # allocated on first use: a cma run never pays for it
            if self._buf is None:
                self._buf = np.ones(self._max, dtype=np.uint8)  # touched, like a real cache
            return memoryview(self._buf.data)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._lsock.accept()
            except OSError:
                return
            if not self._conns.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="raw-socket-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        hdr = bytearray(_HEADER.size)
        try:
            with conn:
                tune(conn, DEFAULT_SOCK_BUF)
                view = self._view()
                while True:
                    _recv_exact(conn, memoryview(hdr))
                    op, off, n = _HEADER.unpack(hdr)
                    if off + n > self._max:
                        return  # a request beyond the buffer: drop the connection
                    if op == _PULL:
                        conn.sendall(view[off : off + n])
                    else:
                        _recv_exact(conn, view[off : off + n])
                        conn.sendall(b"\1")
        except (ConnectionError, OSError):
            pass
        finally:
            self._conns.release()

    def close(self) -> None:
        self._lsock.close()


class RawSocketClient:
    """The initiator's end: ``streams`` connections, one request at a time, each request cut
    into one contiguous part per stream (as the tcp transport cuts it) moved in parallel; the
    calling thread moves the first part, a thread per other stream the rest."""

    def __init__(
        self, port: int, max_bytes: int, streams: int = 1, host: str = "127.0.0.1"
    ) -> None:
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self.streams = streams
        self._socks: list[socket.socket] = []
        try:
            for _ in range(streams):
                sock = socket.create_connection((host, port))
                self._socks.append(sock)
                tune(sock, DEFAULT_SOCK_BUF)
        except OSError:
            self.close()
            raise
        self._pool = (
            ThreadPoolExecutor(streams - 1, thread_name_prefix="raw-stream")
            if streams > 1
            else None
        )
        self._buf = np.ones(max_bytes, dtype=np.uint8)
        self._view = memoryview(self._buf.data)

    def _part(self, i: int, op: str, off: int, n: int) -> None:
        sock = self._socks[i]
        if op == "pull":
            sock.sendall(_HEADER.pack(_PULL, off, n))
            _recv_exact(sock, self._view[off : off + n])
        else:
            sock.sendall(_HEADER.pack(_PUSH, off, n))
            sock.sendall(self._view[off : off + n])
            _recv_exact(sock, memoryview(bytearray(1)))

    def request(self, op: str, nbytes: int) -> None:
        """Move ``nbytes`` from the target (pull) or to it (push), and wait until it is done."""
        parts = cut(nbytes, self.streams)
        if self._pool is None or len(parts) == 1:
            off, n = parts[0]
            self._part(0, op, off, n)
            return
        futs = [
            self._pool.submit(self._part, i, op, off, n)
            for i, (off, n) in enumerate(parts)
            if i > 0
        ]
        off, n = parts[0]
        self._part(0, op, off, n)
        for f in futs:
            f.result()

    def requests(self, op: str, nbytes: int, count: int) -> tuple[float, list[float]]:
        """``count`` requests back to back; ``(wall seconds, per-request seconds)``."""
        lat = []
        t0 = time.perf_counter()
        for _ in range(count):
            t1 = time.perf_counter()
            self.request(op, nbytes)
            lat.append(time.perf_counter() - t1)
        return time.perf_counter() - t0, lat

    def close(self) -> None:
        pool: ThreadPoolExecutor | None = getattr(self, "_pool", None)  # None: __init__ failed
        if pool is not None:
            pool.shutdown(wait=True)
        for sock in self._socks:
            sock.close()
