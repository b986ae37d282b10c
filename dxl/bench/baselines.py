"""Baselines measured in the same run as dxl: the ceilings a transfer is compared against.

- ``memcpy``: one thread copying the same piece lists between two local caches of the same
  layout (``dxl_copy_pieces(..., 1)``): the ceiling for same-host transports (cma).
- ``raw_socket``: one TCP connection over loopback between the target and the initiator; per
  request the initiator sends a 9-byte header and the bytes of the request move as one
  ``sendall`` / ``recv_into(MSG_WAITALL)`` between two contiguous buffers, all inside CPython's
  C socket code: the simplest honest ceiling for one ``tcp`` stream (no piece list, no scatter).
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np

from .. import _ffi
from ..memory.plan import Pieces, block_pieces

SOCK_BUF = 4 << 20  # the tcp transport's default socket buffers
_HEADER = struct.Struct("<BQ")  # op (0 pull: target sends; 1 push: target receives), bytes
_PULL, _PUSH = 0, 1


def plan_requests(
    dst_addrs: list[int], src_addrs: list[int], tables: list[np.ndarray], block_bytes: int
) -> list[Pieces]:
    """The piece list of each request (block b of every tensor to block b), planned by dxl."""
    dst = np.asarray(dst_addrs, dtype=np.uint64)
    src = np.asarray(src_addrs, dtype=np.uint64)
    return [block_pieces(dst, src, t, t, block_bytes) for t in tables]


def memcpy_requests(plans: list[Pieces]) -> tuple[float, list[float]]:
    """Copy each planned request with one thread; ``(wall seconds, per-request seconds)``."""
    lib, ptr = _ffi.lib, _ffi.as_u64_ptr
    lat = []
    t0 = time.perf_counter()
    for p in plans:
        t1 = time.perf_counter()
        _ffi.check(lib.dxl_copy_pieces(ptr(p.dst), ptr(p.src), ptr(p.length), p.count, 1), "memcpy")
        lat.append(time.perf_counter() - t1)
    return time.perf_counter() - t0, lat


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    pos, n = 0, len(view)
    while pos < n:
        got = sock.recv_into(view[pos:], n - pos, socket.MSG_WAITALL)
        if not got:
            raise ConnectionError("raw socket baseline: peer closed the connection")
        pos += got


class RawSocketServer:
    """The target's end: a thread serving one connection at a time on 127.0.0.1."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._lsock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="raw-socket", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buf: np.ndarray | None = None
        hdr = bytearray(_HEADER.size)
        while True:
            try:
                conn, _ = self._lsock.accept()
            except OSError:
                return
            with conn:
                _tune(conn)
                if buf is None:
                    buf = np.ones(self._max, dtype=np.uint8)  # touched, like a real cache
                view = buf.data
                try:
                    while True:
                        _recv_exact(conn, memoryview(hdr))
                        op, n = _HEADER.unpack(hdr)
                        if op == _PULL:
                            conn.sendall(view[:n])
                        else:
                            _recv_exact(conn, view[:n])
                            conn.sendall(b"\1")
                except (ConnectionError, OSError):
                    continue

    def close(self) -> None:
        self._lsock.close()


class RawSocketClient:
    """The initiator's end: one connection, one request at a time."""

    def __init__(self, port: int, max_bytes: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port))
        _tune(self._sock)
        self._buf = np.ones(max_bytes, dtype=np.uint8)
        self._view = self._buf.data
        self._ack = bytearray(1)

    def request(self, op: str, nbytes: int) -> None:
        """Move ``nbytes`` from the target (pull) or to it (push), and wait until it is done."""
        if op == "pull":
            self._sock.sendall(_HEADER.pack(_PULL, nbytes))
            _recv_exact(self._sock, self._view[:nbytes])
        else:
            self._sock.sendall(_HEADER.pack(_PUSH, nbytes))
            self._sock.sendall(self._view[:nbytes])
            _recv_exact(self._sock, memoryview(self._ack))

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
        self._sock.close()
