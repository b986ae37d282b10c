"""The native tcp transport through ``dxl._ffi`` only: the data server (dxl_tcp_server_*) and the
client (dxl_tcp_transfer), in one process over loopback TCP.

The "remote" memory is a numpy buffer of this process registered in a region registry, served
by a native server started with that registry to sockets handed to it with
dxl_tcp_server_adopt; the client moves bytes between it and a local buffer. Crafted frames
(struct-packed by hand) check that the server refuses every out-of-range or malformed request
before touching memory, and keeps serving other connections.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from waiting import wait_until

from dxl._ffi import NativeError, as_u64_ptr, check, err_name, ffi, lib

REQ = struct.Struct("<IHHQQQ")  # magic, version, op, id, n, total
REP = struct.Struct("<IHHQiIQ")  # magic, version, op, id, status, detail, total
READ, WRITE = lib.DXL_TCP_OP_READ, lib.DXL_TCP_OP_WRITE
MiB = 1 << 20

# Each test adds regions to a registry of its own and removes them (conftest checks).


def bytes_queued(sock: socket.socket) -> int:
    """Bytes received on ``sock`` and not read yet (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (client, server side)."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = socket.create_connection(lsock.getsockname())
        server, _ = lsock.accept()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


class Registry:
    """A native region registry (``dxl_registry_t``), freed by :meth:`free`."""

    def __init__(self) -> None:
        out = ffi.new("dxl_registry_t **")
        check(lib.dxl_registry_new(out), "new registry")
        self.ptr: Any = out[0]

    def free(self) -> None:
        if self.ptr is not None:
            lib.dxl_registry_free(self.ptr)
            self.ptr = None


@pytest.fixture
def registry() -> Iterator[Registry]:
    reg = Registry()
    yield reg
    reg.free()  # after the server and regions of the test (fixtures tear down in reverse)


_TAGS = itertools.count(1 << 32)


class Server:
    """A native data server, serving `reg`, plus helpers to hand it connections."""

    def __init__(self, reg: Registry, threads: int = 2) -> None:
        out = ffi.new("dxl_tcp_server_t **")
        check(lib.dxl_tcp_server_start(threads, reg.ptr, out), "start")
        self.ptr = out[0]
        self.reg = reg
        self.clients: list[socket.socket] = []

    def connect(self, tag: int | None = None) -> socket.socket:
        """A client socket whose other end the server now owns, adopted with `tag` (None: a tag
        of its own, so that no per-tag limit binds)."""
        if tag is None:
            tag = next(_TAGS)
        client, server = tcp_pair()
        fd = server.detach()
        try:
            check(lib.dxl_tcp_server_adopt(self.ptr, fd, tag), "adopt")
        except NativeError:
            os.close(fd)  # a failed adoption leaves the fd with us
            client.close()
            raise
        self.clients.append(client)
        return client

    def stats(self) -> dict[str, int]:
        out = ffi.new("dxl_tcp_server_stats_t *")
        lib.dxl_tcp_server_stats(self.ptr, out)
        return {k: getattr(out, k) for k in dir(out)}

    def wait_stats(self, **want: int) -> dict[str, int]:
        """The counters once they show `want` (a server thread counts a READ as served just
        after its last byte left, so a client may get there first); fails after 10 s."""
        return wait_until(
            lambda stats: all(stats[k] == v for k, v in want.items()),
            10,
            f"server counters {want}",
            observe=self.stats,
        )

    def stop(self) -> None:
        if self.ptr is not None:
            lib.dxl_tcp_server_stop(self.ptr)
            self.ptr = None
        for c in self.clients:
            c.close()


@pytest.fixture
def server(registry: Registry) -> Iterator[Server]:
    live = lib.dxl_tcp_servers_live()
    srv = Server(registry)
    yield srv
    srv.stop()
    assert lib.dxl_tcp_servers_live() == live


class Region:
    """`size` random bytes registered in `reg` (the "remote" memory)."""

    def __init__(self, size: int, reg: Registry, seed: int = 1) -> None:
        self.buf = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
        self.addr = self.buf.ctypes.data
        self.reg = reg
        out = ffi.new("uint64_t *")
        check(lib.dxl_region_add(reg.ptr, self.addr, size, out), "register")
        self.id = out[0]

    def remove(self) -> None:
        if self.id is not None:
            check(lib.dxl_region_remove(self.reg.ptr, self.id), "unregister")
            self.id = None


@pytest.fixture
def region(registry: Registry) -> Iterator[Region]:
    r = Region(32 * MiB, registry)
    yield r
    r.remove()


def transfer(
    socks: list[socket.socket],
    write: int,
    local: np.ndarray,
    remote: np.ndarray,
    length: np.ndarray,
    timeout_ms: int = 10_000,
) -> tuple[int, int, Any]:
    fds = ffi.new("int[]", [s.fileno() for s in socks])
    res = ffi.new("dxl_tcp_result_t *")
    rc = lib.dxl_tcp_transfer(
        fds,
        len(socks),
        write,
        as_u64_ptr(local),
        as_u64_ptr(remote),
        as_u64_ptr(length),
        length.size,
        timeout_ms,
        res,
    )
    return rc, lib.dxl_last_errno(), res


def random_pieces(
    rng: np.random.Generator, count: int, space: int, max_len: int, base: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` non-overlapping pieces (base + offset, length) inside [0, space), shuffled."""
    lens = rng.integers(1, max_len + 1, count)
    gaps = rng.integers(0, 64, count)
    offs = np.cumsum(gaps + lens) - lens
    assert offs[-1] + lens[-1] <= space, "pieces do not fit"
    order = rng.permutation(count)
    return (offs[order] + base).astype(np.uint64), lens[order].astype(np.uint64)


def gather(buf: np.ndarray, base: int, addrs: np.ndarray, lens: np.ndarray) -> bytes:
    return b"".join(
        buf[a - base : a - base + n].tobytes()
        for a, n in zip(addrs.tolist(), lens.tolist(), strict=True)
    )


@pytest.fixture
def stream_threshold() -> Iterator[None]:
    """Split from 64 KiB per stream so that small tests use every stream."""
    old = lib.dxl_tcp_stream_threshold(64 << 10)
    yield
    lib.dxl_tcp_stream_threshold(old)


# ---- byte-exact transfers ------------------------------------------------------------------------


@pytest.mark.parametrize("nstreams", [1, 4])
def test_read_and_write_many_random_pieces(
    server: Server, region: Region, stream_threshold: None, nstreams: int
) -> None:
    rng = np.random.default_rng(7)
    socks = [server.connect() for _ in range(nstreams)]
    local = np.zeros(32 * MiB, dtype=np.uint8)
    # 3000 small pieces (more than DXL_IOV_MAX per syscall) and 3 multi-MiB ones.
    r_small, l_small = random_pieces(rng, 3000, 16 * MiB, 4096, region.addr)
    r_big = np.array([region.addr + 17 * MiB + i * 5 * MiB for i in range(3)], dtype=np.uint64)
    l_big = np.array([3 * MiB + 5, 4 * MiB, 2 * MiB + 4095], dtype=np.uint64)
    remote = np.concatenate([r_small, r_big])
    length = np.concatenate([l_small, l_big])
    local_addr = np.empty_like(remote)
    cursor = 0
    for i in rng.permutation(remote.size).tolist():  # non-overlapping local placement
        local_addr[i] = local.ctypes.data + cursor
        cursor += int(length[i]) + int(rng.integers(0, 32))
    assert cursor <= local.size
    total = int(length.sum())

    rc, _, res = transfer(socks, 0, local_addr, remote, length)
    assert rc == lib.DXL_OK, err_name(rc)
    assert res.bytes_done == total and res.broken_mask == 0
    assert res.streams_used == nstreams
    assert gather(local, local.ctypes.data, local_addr, length) == gather(
        region.buf, region.addr, remote, length
    )

    # Push new bytes back to other remote places: the reverse direction.
    local[:] = rng.integers(0, 256, local.size, dtype=np.uint8)
    rc, _, res = transfer(socks, 1, local_addr, remote, length)
    assert rc == lib.DXL_OK, err_name(rc)
    assert res.bytes_done == total and res.broken_mask == 0
    assert gather(region.buf, region.addr, remote, length) == gather(
        local, local.ctypes.data, local_addr, length
    )
    stats = server.wait_stats(bytes_sent=total)
    assert stats["requests_rejected"] == 0 and stats["conns_dropped"] == 0
    assert stats["bytes_sent"] == total and stats["bytes_received"] == total
    assert stats["conns_live"] == nstreams


def test_more_pieces_than_one_request_takes(server: Server, region: Region) -> None:
    """More than DXL_TCP_MAX_PIECES pieces go as several requests on one stream."""
    n = lib.DXL_TCP_MAX_PIECES + 4500
    sock = server.connect()
    # Every other 8-byte word: no piece is contiguous with the next, so nothing merges.
    remote = (region.addr + np.arange(n, dtype=np.uint64) * 16).astype(np.uint64)
    length = np.full(n, 8, dtype=np.uint64)
    local = np.zeros(n * 8, dtype=np.uint8)
    local_addr = (local.ctypes.data + np.arange(n, dtype=np.uint64) * 8).astype(np.uint64)
    rc, _, res = transfer([sock], 0, local_addr, remote, length)
    assert rc == lib.DXL_OK and res.bytes_done == n * 8
    expect = region.buf[: n * 16].reshape(n, 16)[:, :8].ravel()
    assert np.array_equal(local, expect)
    assert server.wait_stats(requests_served=2)["requests_served"] == 2


def test_zero_length_pieces_and_empty_calls(server: Server, region: Region) -> None:
    sock = server.connect()
    local = np.zeros(64, dtype=np.uint8)
    la = np.array([local.ctypes.data, local.ctypes.data + 8], dtype=np.uint64)
    ra = np.array([region.addr, region.addr + 100], dtype=np.uint64)
    ln = np.array([0, 8], dtype=np.uint64)
    rc, _, res = transfer([sock], 0, la, ra, ln)
    assert rc == lib.DXL_OK and res.bytes_done == 8
    assert local[8:16].tobytes() == region.buf[100:108].tobytes()
    assert local[:8].tobytes() == bytes(8)
    empty = np.zeros(0, dtype=np.uint64)
    rc, _, res = transfer([sock], 0, empty, empty, empty)
    assert rc == lib.DXL_OK and res.bytes_done == 0 and res.streams_used == 0


def test_bad_arguments() -> None:
    res = ffi.new("dxl_tcp_result_t *")
    one = np.zeros(1, dtype=np.uint64)
    p = as_u64_ptr(one)
    fds = ffi.new("int[]", [0])
    assert lib.dxl_tcp_transfer(fds, 1, 0, p, p, p, 1, 1000, ffi.NULL) == lib.DXL_E_INVAL
    assert lib.dxl_tcp_transfer(ffi.NULL, 1, 0, p, p, p, 1, 1000, res) == lib.DXL_E_INVAL
    assert lib.dxl_tcp_transfer(fds, 0, 0, p, p, p, 1, 1000, res) == lib.DXL_E_INVAL
    assert lib.dxl_tcp_transfer(fds, 65, 0, p, p, p, 1, 1000, res) == lib.DXL_E_INVAL
    assert lib.dxl_tcp_transfer(fds, 1, 2, p, p, p, 1, 1000, res) == lib.DXL_E_INVAL
    assert lib.dxl_tcp_transfer(fds, 1, 0, p, p, p, 1, 0, res) == lib.DXL_E_INVAL
    assert lib.dxl_tcp_transfer(ffi.new("int[]", [-1]), 1, 0, p, p, p, 1, 10, res) == (
        lib.DXL_E_INVAL
    )
    wrap = as_u64_ptr(np.array([2**64 - 4], dtype=np.uint64))
    eight = as_u64_ptr(np.array([8], dtype=np.uint64))
    assert lib.dxl_tcp_transfer(fds, 1, 0, wrap, p, eight, 1, 10, res) == lib.DXL_E_INVAL
    out = ffi.new("dxl_tcp_server_t **")
    reg = Registry()
    assert lib.dxl_tcp_server_start(0, reg.ptr, out) == lib.DXL_E_INVAL
    assert lib.dxl_tcp_server_start(lib.DXL_TCP_MAX_THREADS + 1, reg.ptr, out) == lib.DXL_E_INVAL
    assert lib.dxl_tcp_server_start(1, ffi.NULL, out) == lib.DXL_E_INVAL  # no registry
    assert lib.dxl_tcp_server_start(1, reg.ptr, ffi.NULL) == lib.DXL_E_INVAL
    reg.free()
    assert lib.dxl_tcp_server_adopt(ffi.NULL, 0, 0) == lib.DXL_E_INVAL
    assert lib.dxl_tcp_server_revoke(ffi.NULL, 0, ffi.NULL) == lib.DXL_E_INVAL
    assert lib.dxl_tcp_server_fence(ffi.NULL, 0, ffi.NULL) == lib.DXL_E_INVAL
    lib.dxl_tcp_server_stop(ffi.NULL)
    for code in ("DXL_E_TIMEDOUT", "DXL_E_PEER", "DXL_E_PROTO", "DXL_E_REMOTE"):
        assert err_name(getattr(lib, code)) == code
    assert (lib.DXL_E_TIMEDOUT, lib.DXL_E_PEER, lib.DXL_E_PROTO, lib.DXL_E_REMOTE) == (
        -11,
        -12,
        -13,
        -14,
    )


def test_adopt_failure_leaves_fd_with_caller(server: Server) -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        assert lib.dxl_tcp_server_adopt(server.ptr, r, 1) == lib.DXL_E_INVAL  # closed fd: EBADF
        assert lib.dxl_last_errno() == 9
    finally:
        os.close(w)


# ---- streams run on the shared worker pool -------------------------------------------------------
#
# dxl_tcp_transfer runs its streams as tasks of the pool that split cma transfers and local copies
# use: the calling thread takes stream 0, at most DXL_MAX_THREADS - 1 workers take others, and the
# calling thread runs whatever no worker picked up.


def test_more_streams_than_the_pool_has_workers(
    server: Server, region: Region, stream_threshold: None
) -> None:
    """DXL_TCP_MAX_STREAMS streams, far more than the pool's workers: every stream still carries
    its part, byte-exact, in both directions."""
    nstreams = lib.DXL_TCP_MAX_STREAMS
    assert nstreams > lib.DXL_MAX_THREADS
    rng = np.random.default_rng(21)
    socks = [server.connect() for _ in range(nstreams)]
    remote, length = random_pieces(rng, 2000, 16 * MiB, 8192, region.addr)
    total = int(length.sum())
    assert total >= nstreams * (64 << 10)  # every stream gets a part
    local = np.zeros(16 * MiB, dtype=np.uint8)
    local_addr = remote - np.uint64(region.addr) + np.uint64(local.ctypes.data)

    rc, _, res = transfer(socks, 0, local_addr, remote, length)
    assert rc == lib.DXL_OK, err_name(rc)
    assert res.streams_used == nstreams
    assert res.bytes_done == total and res.broken_mask == 0
    base = local.ctypes.data
    assert gather(local, base, local_addr, length) == gather(
        region.buf, region.addr, remote, length
    )

    local[:] = rng.integers(0, 256, local.size, dtype=np.uint8)
    rc, _, res = transfer(socks, 1, local_addr, remote, length)
    assert rc == lib.DXL_OK, err_name(rc)
    assert res.bytes_done == total and res.broken_mask == 0
    assert gather(region.buf, region.addr, remote, length) == gather(
        local, base, local_addr, length
    )
    stats = server.wait_stats(bytes_sent=total, conns_live=nstreams)
    assert stats["requests_rejected"] == 0 and stats["conns_dropped"] == 0
    assert stats["conns_live"] == nstreams


def split_copy_ok(seed: int, threads: int = 4, size: int = 2 * MiB) -> bool:
    """One local copy of random pieces split across `threads` (with a 16 KiB split threshold)."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    off, lens = random_pieces(rng, 500, size // 2, 2000, 0)
    old = lib.dxl_split_threshold(16 << 10)
    try:
        rc = lib.dxl_copy_pieces(
            as_u64_ptr(off + np.uint64(dst.ctypes.data)),
            as_u64_ptr(off + np.uint64(src.ctypes.data)),
            as_u64_ptr(lens),
            len(lens),
            threads,
        )
    finally:
        lib.dxl_split_threshold(old)
    return rc == lib.DXL_OK and gather(dst, 0, off, lens) == gather(src, 0, off, lens)


def test_split_copies_run_while_streams_hold_every_worker(stream_threshold: None) -> None:
    """A transfer on DXL_MAX_THREADS streams that nobody answers (no timeout) holds the calling
    thread and every pool worker. Split copies started meanwhile never wait for the busy pool: they
    finish, on their calling threads, while that transfer is still blocked."""
    nstreams = lib.DXL_MAX_THREADS
    pairs = [tcp_pair() for _ in range(nstreams)]
    local = np.zeros(nstreams * (64 << 10), dtype=np.uint8)
    la = np.array([local.ctypes.data], dtype=np.uint64)
    ra = np.array([0x10000], dtype=np.uint64)
    ln = np.array([local.size], dtype=np.uint64)
    out: list[tuple[int, int, Any]] = []
    caller = threading.Thread(
        target=lambda: out.append(transfer([c for c, _ in pairs], 0, la, ra, ln, timeout_ms=-1))
    )
    caller.start()
    try:
        # Every stream has sent its request: all of them are running, each on its own thread.
        for _, silent in pairs:
            assert len(recv_exactly(silent, REQ.size, timeout=30)) == REQ.size
        copies: list[bool] = []
        workers = [
            threading.Thread(target=lambda k=k: copies.extend(split_copy_ok(k) for _ in range(3)))
            for k in range(3)
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert copies == [True] * 9
        assert caller.is_alive() and not out  # the streams are still waiting for replies
    finally:
        for _, silent in pairs:
            silent.close()  # EOF: the transfer fails and returns
        caller.join()
        for client, _ in pairs:
            client.close()
    rc, _, res = out[0]
    assert rc == lib.DXL_E_PEER, err_name(rc)
    assert res.streams_used == nstreams and res.broken_mask == (1 << nstreams) - 1


def test_concurrent_transfers_and_split_copies_share_the_pool(
    server: Server, region: Region, stream_threshold: None
) -> None:
    """Several callers, each with its own streams and its own part of the memory, alongside split
    copies: every byte arrives and every call returns."""
    ncallers, nstreams, span = 3, 6, 4 * MiB
    results: list[bool] = []
    socks = [[server.connect() for _ in range(nstreams)] for _ in range(ncallers)]

    def caller(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        base = region.addr + k * span
        remote, length = random_pieces(rng, 400, span, 8192, base)
        local = np.zeros(span, dtype=np.uint8)
        local_addr = remote - np.uint64(base) + np.uint64(local.ctypes.data)
        total = int(length.sum())
        for i in range(4):
            write = i % 2
            if write:
                local[:] = rng.integers(0, 256, span, dtype=np.uint8)
            rc, _, res = transfer(socks[k], write, local_addr, remote, length)
            here = gather(local, local.ctypes.data, local_addr, length)
            there = gather(region.buf, region.addr, remote, length)
            results.append(rc == lib.DXL_OK and res.bytes_done == total and here == there)

    def copier(k: int) -> None:
        results.extend(split_copy_ok(1000 + k * 10 + i) for i in range(4))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(ncallers)]
    threads += [threading.Thread(target=copier, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * (ncallers * 4 + 2 * 4)


@pytest.mark.multiproc
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_transfer_in_a_forked_child(server: Server, region: Region, stream_threshold: None) -> None:
    """The pool's workers do not survive fork: a child's multi-stream transfer starts its own."""
    socks = [server.connect() for _ in range(4)]
    local = np.zeros(MiB, dtype=np.uint8)
    la = np.array([local.ctypes.data], dtype=np.uint64)
    ra = np.array([region.addr], dtype=np.uint64)
    ln = np.array([MiB], dtype=np.uint64)
    rc, _, res = transfer(socks, 0, la, ra, ln)  # the pool has workers now
    assert rc == lib.DXL_OK and res.streams_used == 4
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            child = Server(region.reg)
            csocks = [child.connect() for _ in range(4)]
            local[:] = 0
            rc, _, res = transfer(csocks, 0, la, ra, ln)
            ok = rc == lib.DXL_OK and res.streams_used == 4
            ok = ok and local.tobytes() == region.buf[:MiB].tobytes()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ---- crafted requests: only registered memory is ever touched ------------------------------------


def send_request(
    sock: socket.socket,
    op: int,
    pieces: list[tuple[int, int]],
    *,
    total: int | None = None,
    n: int | None = None,
    magic: int = lib.DXL_TCP_REQ_MAGIC,
    version: int = lib.DXL_TCP_VERSION,
    rid: int = 77,
    payload: bytes | None = None,
) -> None:
    if total is None:
        total = sum(ln for _, ln in pieces) % 2**64
    hdr = REQ.pack(magic, version, op, rid, len(pieces) if n is None else n, total)
    table = b"".join(struct.pack("<QQ", a % 2**64, ln % 2**64) for a, ln in pieces)
    sock.sendall(hdr + table + (payload or b""))


def recv_exactly(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def recv_reply(sock: socket.socket) -> tuple[int, int, int, int, int]:
    """(status, detail, total, op, id) of the next reply."""
    raw = recv_exactly(sock, REP.size)
    assert len(raw) == REP.size, "no reply"
    magic, version, op, rid, status, detail, total = REP.unpack(raw)
    assert (magic, version) == (lib.DXL_TCP_REP_MAGIC, lib.DXL_TCP_VERSION)
    return status, detail, total, op, rid


def assert_closed(sock: socket.socket) -> None:
    sock.settimeout(5.0)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""


def assert_serves(srv: Server, region: Region) -> None:
    """A fresh connection still gets byte-exact data."""
    sock = srv.connect()
    send_request(sock, READ, [(region.addr + 10, 100), (region.addr + 5000, 28)])
    status, _, total, _, _ = recv_reply(sock)
    assert (status, total) == (lib.DXL_OK, 128)
    data = recv_exactly(sock, 128)
    assert data == region.buf[10:110].tobytes() + region.buf[5000:5028].tobytes()


def test_refused_but_well_formed_requests_keep_the_connection(
    server: Server, region: Region
) -> None:
    """Out-of-range pieces get DXL_E_RANGE naming the piece; the stream stays usable, and a refused
    WRITE's payload is discarded, not written anywhere."""
    end = region.addr + region.buf.size
    guard = np.frombuffer(bytearray(4096), dtype=np.uint8)  # real memory, never registered
    sock = server.connect()
    cases = [
        [(guard.ctypes.data, 16)],  # outside every region
        [(region.addr, 8), (end - 8, 16)],  # straddles the region's end
        [(region.addr - 1, 2)],  # starts just before it
        [(region.addr, 8), (region.addr + 64, 8), (end, 1)],  # one byte past it
    ]
    for i, pieces in enumerate(cases):
        send_request(sock, READ, pieces, rid=100 + i)
        status, detail, total, op, rid = recv_reply(sock)
        assert (status, total, op, rid) == (lib.DXL_E_RANGE, 0, READ, 100 + i)
        assert detail == len(pieces) - 1
    before = region.buf.copy()
    for i, pieces in enumerate(cases):
        payload = b"\xee" * sum(ln for _, ln in pieces)
        send_request(sock, WRITE, pieces, rid=200 + i, payload=payload)
        status, detail, total, op, rid = recv_reply(sock)
        assert (status, total, op, rid) == (lib.DXL_E_RANGE, 0, WRITE, 200 + i)
    assert np.array_equal(region.buf, before), "a refused write touched registered memory"
    assert not guard.any(), "a refused write touched unregistered memory"
    # The same connection still works.
    send_request(sock, READ, [(region.addr, 16)])
    assert recv_reply(sock)[:3] == (lib.DXL_OK, 0, 16)
    assert recv_exactly(sock, 16) == region.buf[:16].tobytes()
    stats = server.stats()
    assert stats["requests_rejected"] == 2 * len(cases)
    assert stats["conns_dropped"] == 0


MALFORMED = {
    "bad magic": dict(pieces=[(0, 8)], magic=0x12345678, expect=lib.DXL_E_PROTO),
    "bad version": dict(pieces=[(0, 8)], version=99, expect=lib.DXL_E_UNSUPPORTED),
    "unknown op": dict(pieces=[(0, 8)], op=7, expect=lib.DXL_E_PROTO),
    "oversize piece count": dict(pieces=[], n=lib.DXL_TCP_MAX_PIECES + 1, expect=lib.DXL_E_PROTO),
    "huge piece count": dict(pieces=[], n=2**63, expect=lib.DXL_E_PROTO),
    "total too small": dict(pieces=[(0, 8), (64, 8)], total=8, expect=lib.DXL_E_PROTO),
    "total too large": dict(pieces=[(0, 8)], total=9, expect=lib.DXL_E_PROTO),
    "addr + len overflows": dict(pieces=[(2**64 - 4, 8)], expect=lib.DXL_E_PROTO, raw=True),
    "lens overflow the total": dict(
        pieces=[(0, 2**63), (0, 2**63), (0, 8)], total=8, expect=lib.DXL_E_PROTO
    ),
    "piece over 1 GiB": dict(pieces=[(0, lib.DXL_TCP_MAX_PIECE_LEN + 1)], expect=lib.DXL_E_PROTO),
}


@pytest.mark.parametrize("op", [READ, WRITE])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_close_only_that_connection(
    server: Server, region: Region, case: str, op: int
) -> None:
    spec = dict(MALFORMED[case])
    expect = spec.pop("expect")
    raw = spec.pop("raw", False)
    req_op = spec.pop("op", op)
    pieces = [(a if raw else region.addr + a, ln) for a, ln in spec.pop("pieces")]
    before = region.buf.copy()
    bystander = server.connect()  # an idle connection that must survive
    sock = server.connect()
    payload = b"\xab" * 16 if op == WRITE else None
    send_request(sock, req_op, pieces, payload=payload, **spec)
    status, _, total, _, _ = recv_reply(sock)
    assert (status, total) == (expect, 0)
    assert_closed(sock)
    assert np.array_equal(region.buf, before)
    assert_serves(server, region)
    send_request(bystander, READ, [(region.addr + 1, 3)])
    assert recv_reply(bystander)[:3] == (lib.DXL_OK, 0, 3)
    stats = server.stats()
    assert stats["conns_dropped"] == 1 and stats["requests_rejected"] == 1


def test_garbage_and_truncated_frames(server: Server, region: Region) -> None:
    """Garbage, a header cut short and a table cut short: each connection is dropped alone."""
    g = server.connect()
    g.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
    status, *_ = recv_reply(g)
    assert status == lib.DXL_E_PROTO
    assert_closed(g)
    h = server.connect()
    h.sendall(REQ.pack(lib.DXL_TCP_REQ_MAGIC, 1, READ, 1, 2, 16)[:20])
    t = server.connect()
    t.sendall(REQ.pack(lib.DXL_TCP_REQ_MAGIC, 1, READ, 1, 2, 16) + b"\0" * 20)
    # A WRITE whose payload never fully arrives. The bytes that did arrive may land (tcp
    # writes stream into place), so it targets memory that assert_serves does not read.
    w = server.connect()
    send_request(w, WRITE, [(region.addr + 16 * MiB, 4096)], payload=b"\1" * 100)
    assert_serves(server, region)  # the stalled ones do not block others
    for s in (h, t, w):
        s.close()
    server.wait_stats(conns_dropped=4)
    assert server.stats()["conns_live"] == 1  # assert_serves's connection


def test_unregistered_memory_is_refused_after_removal(server: Server) -> None:
    r = Region(1 * MiB, server.reg, seed=3)
    sock = server.connect()
    send_request(sock, READ, [(r.addr, 64)])
    assert recv_reply(sock)[0] == lib.DXL_OK
    recv_exactly(sock, 64)
    r.remove()
    assert lib.dxl_tcp_server_fence(server.ptr, 1000, ffi.NULL) == lib.DXL_OK
    send_request(sock, READ, [(r.addr, 64)])
    assert recv_reply(sock)[0] == lib.DXL_E_RANGE


def test_a_server_serves_its_own_registry_only(server: Server, region: Region) -> None:
    """Two registries in one process (two engines): a server started with one refuses memory
    registered only in the other (DXL_E_RANGE), for reads and writes, and the other registry's
    own server serves it."""
    other_reg = Registry()
    other = Region(MiB, other_reg, seed=9)
    other_srv = Server(other_reg)
    try:
        sock = server.connect()
        send_request(sock, READ, [(other.addr, 64)])
        assert recv_reply(sock)[:3] == (lib.DXL_E_RANGE, 0, 0)
        before = other.buf.copy()
        send_request(sock, WRITE, [(other.addr, 64)], payload=b"\xee" * 64)
        assert recv_reply(sock)[:3] == (lib.DXL_E_RANGE, 0, 0)
        assert np.array_equal(other.buf, before)
        send_request(sock, READ, [(region.addr, 8), (other.addr, 8)])
        assert recv_reply(sock)[:2] == (lib.DXL_E_RANGE, 1)  # the second piece is refused
        assert_serves(server, region)  # its own memory: still served
        sock2 = other_srv.connect()
        send_request(sock2, READ, [(region.addr, 64)])  # the first server's memory: refused
        assert recv_reply(sock2)[:3] == (lib.DXL_E_RANGE, 0, 0)
        send_request(sock2, READ, [(other.addr, 64)])
        assert recv_reply(sock2)[:3] == (lib.DXL_OK, 0, 64)
        assert recv_exactly(sock2, 64) == other.buf[:64].tobytes()
    finally:
        other_srv.stop()
        other.remove()
        other_reg.free()


# ---- revoking tagged connections -----------------------------------------------------------------


def pull_ok(sock: socket.socket, region: Region, off: int = 0, size: int = 4096) -> bool:
    local = np.zeros(size, dtype=np.uint8)
    la = np.array([local.ctypes.data], dtype=np.uint64)
    ra = np.array([region.addr + off], dtype=np.uint64)
    ln = np.array([size], dtype=np.uint64)
    rc, _, _ = transfer([sock], 0, la, ra, ln)
    return rc == lib.DXL_OK and local.tobytes() == region.buf[off : off + size].tobytes()


def revoke(server: Server, tag: int) -> int:
    out = ffi.new("uint64_t *")
    check(lib.dxl_tcp_server_revoke(server.ptr, tag, out), "revoke")
    return int(out[0])


def test_revoke_closes_exactly_the_tagged_connections(server: Server, region: Region) -> None:
    tagged = [server.connect(tag=7) for _ in range(3)]
    others = [server.connect(tag=8), server.connect(tag=7 << 32), server.connect(tag=0)]
    assert all(pull_ok(s, region) for s in tagged + others)

    assert revoke(server, 7) == 3
    stats = server.wait_stats(conns_revoked=3, conns_live=3)
    assert (stats["conns_revoked"], stats["conns_live"]) == (3, 3)
    assert stats["conns_dropped"] == 0
    for sock in tagged:  # the next request fails: the connection is gone
        local = np.zeros(64, dtype=np.uint8)
        la = np.array([local.ctypes.data], dtype=np.uint64)
        ra = np.array([region.addr], dtype=np.uint64)
        ln = np.array([64], dtype=np.uint64)
        rc, _, res = transfer([sock], 0, la, ra, ln)
        assert rc == lib.DXL_E_PEER, err_name(rc)
        assert res.broken_mask == 1 and not local.any()
    assert all(pull_ok(s, region, off=8192) for s in others)  # the rest: served as before
    assert revoke(server, 7) == 0  # nothing left with that tag
    assert revoke(server, 12345) == 0
    late = server.connect(tag=7)  # adopted after the revoke: not affected (the caller's call)
    assert pull_ok(late, region)
    assert server.stats()["conns_revoked"] == 3


def recv_until_closed(sock: socket.socket, limit: int) -> bytes:
    """Everything the server sends until it closes (EOF or reset), at most `limit` + 1 bytes."""
    sock.settimeout(30)
    buf = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while len(buf) <= limit:
            chunk = sock.recv(min(1 << 20, limit + 1 - len(buf)))
            if not chunk:
                break
            buf += chunk
    return bytes(buf)


def test_revoke_lets_a_running_request_finish_and_starts_no_new_one(
    server: Server, region: Region
) -> None:
    """A READ stuck mid-reply when the revoke comes runs to its end, byte-exact, and then its
    connection closes. With another request queued behind it, that one never starts (the close
    then resets the connection: unread bytes were pending, so the tail may be lost)."""
    size = 16 * MiB
    for queued in (False, True):
        tag = 5 + queued
        sock = server.connect(tag=tag)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        send_request(sock, READ, [(region.addr, size)], rid=1)
        status, _, total, _, rid = recv_reply(sock)  # the reply began: the request is running
        assert (status, total, rid) == (lib.DXL_OK, size, 1)
        if queued:
            send_request(sock, READ, [(region.addr, 64)], rid=2)
        assert revoke(server, tag) == 1
        # it cannot end while we do not read, so it is still open (no timing involved)
        assert server.stats()["conns_live"] == 1
        data = recv_until_closed(sock, size)
        if queued:  # no second reply: never more than the first request's bytes
            assert len(data) <= size and data == region.buf[: len(data)].tobytes()
        else:
            assert data == region.buf[:size].tobytes()
        stats = server.wait_stats(conns_revoked=1 + queued, conns_live=0)
        assert (stats["conns_revoked"], stats["conns_live"]) == (1 + queued, 0)
        assert stats["requests_served"] == 1 + queued  # the first request of each, only
        assert stats["requests_rejected"] == 0 and stats["conns_dropped"] == 0


def test_revoke_stops_a_write_whose_table_arrives_later(server: Server, region: Region) -> None:
    """A request half sent when the revoke comes (header in, table not yet) is never served:
    its table completes after the revoke, so nothing is written."""
    sock = server.connect(tag=6)
    before = region.buf.copy()
    hdr = REQ.pack(lib.DXL_TCP_REQ_MAGIC, lib.DXL_TCP_VERSION, WRITE, 3, 1, 64)
    sock.sendall(hdr)
    assert revoke(server, 6) == 1
    with contextlib.suppress(OSError):  # the server may already have closed it
        sock.sendall(struct.pack("<QQ", region.addr, 64) + b"\xee" * 64)
    assert_closed(sock)
    server.wait_stats(conns_live=0)
    assert np.array_equal(region.buf, before)
    assert server.stats()["requests_served"] == 0


# ---- limits on connections and their memory --------------------------------------------------


def adopt_pair(server: Server, tag: int) -> tuple[int, socket.socket, socket.socket]:
    """Offer one end of a fresh socket pair to the server: (rc, our end, the offered end)."""
    ours, theirs = socket.socketpair()
    rc = lib.dxl_tcp_server_adopt(server.ptr, theirs.fileno(), tag)
    if rc == lib.DXL_OK:
        theirs.detach()  # the server owns that fd now
    return rc, ours, theirs


def test_connections_per_tag_are_capped(server: Server, region: Region) -> None:
    cap = lib.DXL_TCP_MAX_CONNS_PER_TAG
    held = [server.connect(tag=9) for _ in range(cap)]
    rc, ours, theirs = adopt_pair(server, 9)
    assert rc == lib.DXL_E_LIMIT, err_name(rc)
    assert err_name(rc) == "DXL_E_LIMIT"
    assert lib.DXL_E_LIMIT == -15
    assert theirs.fileno() >= 0  # refused: still ours, usable and closable
    theirs.close()
    ours.close()
    stats = server.stats()
    assert stats["conns_refused"] == 1 and stats["conns_live"] == cap
    assert pull_ok(held[0], region) and pull_ok(held[-1], region)  # the others: served
    assert pull_ok(server.connect(tag=10), region)  # other tags: not affected
    held.pop().close()  # one of them goes: room for one more
    server.wait_stats(conns_live=cap)
    assert pull_ok(server.connect(tag=9), region)
    assert revoke(server, 9) == cap  # a revoke: room again once they are closed
    server.wait_stats(conns_live=1)
    assert pull_ok(server.connect(tag=9), region)


def test_connections_per_server_are_capped(server: Server, region: Region) -> None:
    cap = lib.DXL_TCP_MAX_CONNS
    mine: list[socket.socket] = []
    try:
        for i in range(cap - 1):
            rc, ours, _ = adopt_pair(server, i)
            assert rc == lib.DXL_OK, err_name(rc)
            mine.append(ours)
        probe = server.connect()  # the last one allowed
        rc, ours, theirs = adopt_pair(server, cap + 1)
        assert rc == lib.DXL_E_LIMIT, err_name(rc)
        ours.close()
        theirs.close()
        assert server.stats()["conns_refused"] == 1
        assert pull_ok(probe, region)  # the server keeps serving what it holds
        mine.pop().close()
        server.wait_stats(conns_live=cap - 1)
        assert pull_ok(server.connect(), region)
    finally:
        for sock in mine:
            sock.close()


def test_a_large_request_leaves_no_large_buffers(server: Server, region: Region) -> None:
    """After a request of DXL_TCP_MAX_PIECES entries (~2 MiB of table buffers), the connection
    keeps at most DXL_TCP_CONN_BUF_KEEP bytes: an idle connection holds little memory."""
    keep = lib.DXL_TCP_CONN_BUF_KEEP
    sock = server.connect()
    idle = server.stats()["buffer_bytes"]
    assert 0 < idle < 4096  # one fresh connection
    n = lib.DXL_TCP_MAX_PIECES
    remote = (region.addr + np.arange(n, dtype=np.uint64) * 16).astype(np.uint64)
    length = np.full(n, 8, dtype=np.uint64)
    local = np.zeros(n * 8, dtype=np.uint8)
    local_addr = (local.ctypes.data + np.arange(n, dtype=np.uint64) * 8).astype(np.uint64)
    for write in (0, 1):
        rc, _, res = transfer([sock], write, local_addr, remote, length)
        assert rc == lib.DXL_OK and res.bytes_done == n * 8
        stats = server.wait_stats(buffer_bytes=idle)  # trimmed as the request ends
        assert stats["buffer_bytes"] == idle < keep
    assert server.stats()["requests_served"] == 2
    # a request just under the threshold keeps its buffers (no reallocation per request)
    m = 4096
    rc, _, _ = transfer([sock], 0, local_addr[:m], remote[:m], length[:m])
    assert rc == lib.DXL_OK
    stats = server.wait_stats(requests_served=3)
    assert idle < stats["buffer_bytes"] <= keep


# ---- the client's failure handling ---------------------------------------------------------------


def test_timeout_when_nobody_answers() -> None:
    client, silent = tcp_pair()  # nobody serves `silent`
    try:
        local = np.zeros(64, dtype=np.uint8)
        la = np.array([local.ctypes.data], dtype=np.uint64)
        ra = np.array([0x1000], dtype=np.uint64)
        ln = np.array([64], dtype=np.uint64)
        t0 = time.monotonic()
        rc, _, res = transfer([client], 0, la, ra, ln, timeout_ms=200)
        elapsed = time.monotonic() - t0
        assert rc == lib.DXL_E_TIMEDOUT, err_name(rc)
        assert elapsed >= 0.2  # not before its timeout
        assert res.broken_mask == 1 and res.bytes_done == 0
    finally:
        client.close()
        silent.close()


def test_server_stopped_with_connections_open(region: Region) -> None:
    srv = Server(region.reg)
    socks = [srv.connect() for _ in range(2)]
    lib.dxl_tcp_server_stop(srv.ptr)
    srv.ptr = None
    local = np.zeros(64, dtype=np.uint8)
    la = np.array([local.ctypes.data], dtype=np.uint64)
    ra = np.array([region.addr], dtype=np.uint64)
    ln = np.array([64], dtype=np.uint64)
    # the closed connections fail it: its timeout is beyond pytest's, and would be DXL_E_TIMEDOUT
    rc, _, res = transfer(socks, 0, la, ra, ln, timeout_ms=300_000)
    assert rc == lib.DXL_E_PEER, err_name(rc)
    assert res.broken_mask & 1
    srv.stop()


class FakeServer:
    """Answers the first request on a socket with a crafted reply, then optionally closes."""

    def __init__(self, reply: Any) -> None:
        self.client, self.peer = tcp_pair()
        self.reply = reply
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        hdr = recv_exactly(self.peer, REQ.size)
        _, _, op, rid, n, total = REQ.unpack(hdr)
        recv_exactly(self.peer, 16 * n)
        self.reply(self.peer, op, rid, total)

    def close(self) -> None:
        self.thread.join(5)
        self.client.close()
        self.peer.close()


def _pull_one(sock: socket.socket, size: int, timeout_ms: int = 3000) -> tuple[int, Any]:
    local = np.zeros(size, dtype=np.uint8)
    la = np.array([local.ctypes.data], dtype=np.uint64)
    ra = np.array([0x10000], dtype=np.uint64)
    ln = np.array([size], dtype=np.uint64)
    rc, _, res = transfer([sock], 0, la, ra, ln, timeout_ms=timeout_ms)
    return rc, res


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("eof mid data", lib.DXL_E_PEER),
        ("wrong id", lib.DXL_E_PROTO),
        ("wrong total", lib.DXL_E_PROTO),
        ("wrong magic", lib.DXL_E_PROTO),
        ("positive status", lib.DXL_E_PROTO),
        ("refusal", lib.DXL_E_REMOTE),
    ],
)
def test_client_validates_replies(name: str, expect: int) -> None:
    def reply(sock: socket.socket, op: int, rid: int, total: int) -> None:
        magic, status, body = lib.DXL_TCP_REP_MAGIC, 0, b"x" * total
        if name == "eof mid data":
            body = body[: total // 2]
        elif name == "wrong id":
            rid += 1
        elif name == "wrong total":
            total -= 1
        elif name == "wrong magic":
            magic = 0
        elif name == "positive status":
            status = 5
        elif name == "refusal":
            status, total, body = lib.DXL_E_RANGE, 0, b""
        sock.sendall(REP.pack(magic, 1, op, rid, status, 3, total) + body)
        if name == "eof mid data":
            sock.close()

    fake = FakeServer(reply)
    try:
        rc, res = _pull_one(fake.client, 4096)
        assert rc == expect, err_name(rc)
        if name == "refusal":
            assert (res.remote_status, res.remote_detail) == (lib.DXL_E_RANGE, 3)
            assert res.broken_mask == 0  # a clean refusal leaves the stream in step
        else:
            assert res.broken_mask == 1
        if name == "eof mid data":
            assert res.bytes_done == 2048
    finally:
        fake.close()


def test_one_failing_stream_stops_the_others(region: Region, stream_threshold: None) -> None:
    """Stream 1 never answers; stream 0 is served. The call fails within its timeout and marks
    exactly the streams left mid-frame."""
    srv = Server(region.reg)
    try:
        good = srv.connect()
        bad, silent = tcp_pair()
        local = np.zeros(4 * MiB, dtype=np.uint8)
        la = np.array([local.ctypes.data], dtype=np.uint64)
        ra = np.array([region.addr], dtype=np.uint64)
        ln = np.array([4 * MiB], dtype=np.uint64)
        rc, _, res = transfer([good, bad], 0, la, ra, ln, timeout_ms=300)
        assert rc == lib.DXL_E_TIMEDOUT, err_name(rc)  # the silent stream's timeout ended it
        assert res.streams_used == 2
        assert res.broken_mask & 2
        if not res.broken_mask & 1:  # stream 0 finished before the failure: exact and in step
            assert local[: 2 * MiB].tobytes() == region.buf[: 2 * MiB].tobytes()
        bad.close()
        silent.close()
    finally:
        srv.stop()


def test_native_error_message() -> None:
    e = NativeError(lib.DXL_E_TIMEDOUT, "tcp pull", 110)
    assert str(e) == "tcp pull: timed out (DXL_E_TIMEDOUT, errno 110 ETIMEDOUT)"


# ---- fence ---------------------------------------------------------------------------------------


def test_fence_waits_for_requests_in_flight_and_cuts_off_stalled_ones(
    server: Server, region: Region
) -> None:
    assert lib.dxl_tcp_server_fence(server.ptr, 0, ffi.NULL) == lib.DXL_OK  # nothing busy
    sock = server.connect()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    # A 16 MiB READ that the client never reads: the server is stuck mid-reply (busy).
    send_request(sock, READ, [(region.addr, 16 * MiB)])
    wait_until(  # the reply has begun: the server is busy with the request
        lambda: bytes_queued(sock), 10, "the first bytes of the reply to arrive"
    )
    aborted = ffi.new("uint64_t *")
    t0 = time.monotonic()
    assert lib.dxl_tcp_server_fence(server.ptr, 100, aborted) == lib.DXL_OK
    assert time.monotonic() - t0 > 0.09  # it waited for the stalled request before cutting it
    assert aborted[0] == 1
    stats = server.stats()
    assert stats["requests_aborted"] == 1 and stats["conns_live"] == 0
    # A fence with nothing in flight returns even with no deadline (-1 waits for ever otherwise).
    assert lib.dxl_tcp_server_fence(server.ptr, -1, aborted) == lib.DXL_OK
    assert aborted[0] == 0
    assert_serves(server, region)
