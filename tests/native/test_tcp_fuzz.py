"""Fuzzing the native data server's request parser (hypothesis).

A registered region sits between two unregistered guard zones of one buffer. Whatever request
arrives (random bytes, or well-framed requests with arbitrary pieces, totals and payloads),
the server answers or closes that connection, never touches the guards, never crashes or hangs,
and keeps serving a fresh connection byte-exactly afterwards.
"""

from __future__ import annotations

import socket
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from test_tcp_native import REP, REQ, Registry, Server, recv_exactly

from dxl._ffi import check, ffi, lib

GUARD, SIZE = 4096, 64 << 10
READ, WRITE = lib.DXL_TCP_OP_READ, lib.DXL_TCP_OP_WRITE
SHARED = [HealthCheck.function_scoped_fixture]  # the fixtures are reset and checked per example


class Guarded:
    """SIZE registered bytes with GUARD unregistered bytes on each side."""

    def __init__(self, reg: Registry) -> None:
        self.reg = reg
        self.buf = np.random.default_rng(3).integers(0, 256, SIZE + 2 * GUARD, dtype=np.uint8)
        self.snapshot = self.buf.copy()
        self.base = self.buf.ctypes.data + GUARD
        out = ffi.new("uint64_t *")
        check(lib.dxl_region_add(reg.ptr, self.base, SIZE, out), "register")
        self.id = out[0]

    def guards_intact(self) -> bool:
        return bool(
            (self.buf[:GUARD] == self.snapshot[:GUARD]).all()
            and (self.buf[-GUARD:] == self.snapshot[-GUARD:]).all()
        )

    def close(self) -> None:
        check(lib.dxl_region_remove(self.reg.ptr, self.id), "unregister")


@pytest.fixture(scope="module")
def target():
    reg = Registry()
    srv, region = Server(reg), Guarded(reg)
    yield srv, region
    srv.stop()
    region.close()
    reg.free()


def still_serves(srv: Server, region: Guarded) -> None:
    sock = srv.connect()
    sock.sendall(
        REQ.pack(lib.DXL_TCP_REQ_MAGIC, lib.DXL_TCP_VERSION, READ, 1, 1, 64)
        + struct.pack("<QQ", region.base + 100, 64)
    )
    reply = recv_exactly(sock, REP.size)
    assert len(reply) == REP.size, "the server stopped answering"
    assert REP.unpack(reply)[4] == lib.DXL_OK
    assert recv_exactly(sock, 64) == region.buf[GUARD + 100 : GUARD + 164].tobytes()
    sock.close()


def drain(sock: socket.socket) -> None:
    """Read whatever the server answers until it closes or goes quiet."""
    sock.settimeout(0.05)
    try:
        while sock.recv(1 << 16):
            pass
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()


@settings(max_examples=60, deadline=None, suppress_health_check=SHARED)
@given(st.binary(min_size=1, max_size=200))
def test_random_bytes(target, data):
    srv, region = target
    sock = srv.connect()
    sock.sendall(data)
    drain(sock)
    assert region.guards_intact()
    still_serves(srv, region)


PIECE = st.tuples(
    st.one_of(st.integers(-GUARD - 64, SIZE + GUARD), st.integers(0, 2**64 - 1)),  # offset
    st.one_of(st.integers(0, 2 * GUARD), st.integers(0, 2**64 - 1)),  # length
)


@settings(max_examples=60, deadline=None, suppress_health_check=SHARED)
@given(
    op=st.sampled_from([READ, WRITE, 0, 3]),
    pieces=st.lists(PIECE, max_size=6),
    total_delta=st.sampled_from([0, 0, 0, 1, -1, 2**63]),
    n_delta=st.sampled_from([0, 0, 1, -1]),
)
def test_framed_requests_with_arbitrary_pieces(target, op, pieces, total_delta, n_delta):
    srv, region = target
    addrs = [(region.base + off) % 2**64 if off < 2**40 else off for off, _ in pieces]
    lens = [ln for _, ln in pieces]
    total = (sum(lens) + total_delta) % 2**64
    n = max(0, len(pieces) + n_delta)
    payload = b""
    if op == WRITE and total <= 4 * GUARD:
        payload = bytes([0xEE]) * total  # what a writer would send
    sock = srv.connect()
    sock.sendall(
        REQ.pack(lib.DXL_TCP_REQ_MAGIC, lib.DXL_TCP_VERSION, op, 9, n, total)
        + b"".join(struct.pack("<QQ", a, ln % 2**64) for a, ln in zip(addrs, lens, strict=True))
        + payload
    )
    drain(sock)
    assert region.guards_intact()  # nothing outside the registered range was written
    still_serves(srv, region)
