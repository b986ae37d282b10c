"""Who may touch which memory through an engine's tcp data server, and for how long.

Several engines in one process (each with its own region registry and data server), linked to
each other over tcp on loopback: a data server serves its own engine's memory only, even to a
client holding a valid data key of one of its links; and a link's data connections end when
its key goes (``DataServer.revoke``), not when they happen to go idle.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
from waiting import async_wait_until

import dxl
from dxl import _ffi
from dxl.control.auth import AuthError, authenticate_socket
from dxl.memory.plan import Pieces
from dxl.memory.regions import RegionRegistry
from dxl.testing import KVBuffers
from dxl.transport.tcp_server import DataServer

S = dxl.LLMStatusCode
TENSORS, BLOCKS, BB = 2, 16, 4096
ALL = list(range(TENSORS))
TCP = {"dxl.Transport": "tcp"}
U64 = np.uint64


def info(eng: dxl.Engine) -> dxl.LLMClusterInfo:
    address = eng.listen_address
    assert address is not None
    out = dxl.LLMClusterInfo()
    out.remote_cluster_id = eng.cluster_id
    out.append_local_ip_info("127.0.0.1", 0)
    out.append_remote_ip_info(*address)
    return out


class Node:
    """A listening engine with one remotely accessible blocks cache of pattern ``seed``."""

    def __init__(self, eng: dxl.Engine, buf: KVBuffers, cache: dxl.Cache) -> None:
        self.eng, self.buf, self.cache = eng, buf, cache

    @property
    def data_stats(self) -> dict[str, int]:
        stats = self.eng.stats()["data_server"]
        assert stats is not None
        return dict(stats)


async def node(cluster_id: int, seed: int) -> Node:
    eng = dxl.Engine(cluster_id, dxl.LLMRole.PROMPT, {**TCP, "llm.listenIpInfo": "127.0.0.1:0"})
    await eng.start()
    buf = KVBuffers(TENSORS, BLOCKS, BB, seed=seed)
    cache = await eng.register_blocks_cache(
        buf.desc(), buf.addrs, dxl.BlocksCacheKey(cluster_id, 0), remote_accessible=True
    )
    return Node(eng, buf, cache)


@pytest.fixture
async def nodes() -> AsyncIterator[Callable[[int, int], asyncio.Future[Node]]]:
    made: list[Node] = []

    async def make(cluster_id: int, seed: int) -> Node:
        n = await node(cluster_id, seed)
        made.append(n)
        return n

    yield make  # type: ignore[misc]
    for n in reversed(made):
        await n.eng.close()


def link_transport(eng: dxl.Engine, cluster_id: int) -> dxl.transport.tcp.TcpTransport:
    """The tcp transport of ``eng``'s link to ``cluster_id`` (its streams hold that link's key)."""
    link = eng._links.get(cluster_id)  # test-only access to the engine's internals
    assert link is not None and link.transport.name == "tcp"
    return link.transport  # type: ignore[return-value]


def pieces(local: np.ndarray, remote: int, length: int) -> Pieces:
    return Pieces(
        np.array([local.ctypes.data], dtype=U64),
        np.array([remote], dtype=U64),
        np.array([length], dtype=U64),
    )


async def test_a_data_server_serves_its_own_engine_only(nodes) -> None:
    """Engines A and B in one process; C links to B. C's streams to B's data port carry a valid
    key of a B link, yet B refuses A's registered memory (DXL_E_RANGE) and serves its own."""
    a = await nodes(10, 3)
    b = await nodes(20, 5)
    c = await nodes(30, 7)
    assert (await c.eng.link_clusters([info(b.eng)]))[0] == S.LLM_SUCCESS
    tr = link_transport(c.eng, 20)
    local = np.zeros(BLOCKS * BB, dtype=np.uint8)
    size = BLOCKS * BB

    with pytest.raises(_ffi.NativeError) as err:  # A's memory, through B's data port
        await asyncio.to_thread(tr.read, pieces(local, a.buf.addrs[0], size))
    assert err.value.code == _ffi.lib.DXL_E_REMOTE
    assert err.value.remote_status == _ffi.lib.DXL_E_RANGE  # type: ignore[attr-defined]
    with pytest.raises(_ffi.NativeError) as err:  # nor may it be written
        await asyncio.to_thread(tr.write, pieces(local, a.buf.addrs[1], 8))
    assert err.value.remote_status == _ffi.lib.DXL_E_RANGE  # type: ignore[attr-defined]
    assert a.buf.untouched(ALL, list(range(BLOCKS)))

    # B's own memory: served, byte-exact, over the same streams
    assert await asyncio.to_thread(tr.read, pieces(local, b.buf.addrs[0], size)) == size
    expect = np.frombuffer(b.buf.words[0].tobytes(), dtype=np.uint8)
    assert np.array_equal(local, expect)
    await c.eng.pull_blocks(dxl.BlocksCacheKey(20, 0), c.cache, [1, 2], [3, 4])
    assert c.buf.matches(ALL, [3, 4], 5, ALL, [1, 2])
    assert b.data_stats["requests_rejected"] == 2
    assert a.data_stats["requests_served"] == 0  # nobody talked to A


# ---- revoking a key's connections ----------------------------------------------------------------


def open_stream(address: tuple[str, int], key: bytes, key_id: bytes) -> socket.socket:
    """One data connection as a TcpTransport opens it: connect, handshake, instance id."""
    sock = socket.create_connection(address, timeout=10)
    try:
        authenticate_socket(sock, key, role="client", purpose="data", key_id=key_id)
        n = sock.recv(1)[0]
        while n:
            n -= len(sock.recv(n))
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def pull_rc(sock: socket.socket, addr: int, size: int = 4096) -> tuple[int, np.ndarray]:
    """One native pull of ``size`` bytes at ``addr`` over ``sock``: (rc, the bytes)."""
    local = np.zeros(size, dtype=np.uint8)
    res = _ffi.ffi.new("dxl_tcp_result_t *")
    fds = _ffi.ffi.new("int[]", [sock.fileno()])
    p = pieces(local, addr, size)
    rc = _ffi.lib.dxl_tcp_transfer(
        fds,
        1,
        0,
        _ffi.as_u64_ptr(p.dst),
        _ffi.as_u64_ptr(p.src),
        _ffi.as_u64_ptr(p.length),
        1,
        10_000,
        res,
    )
    return rc, local


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


async def test_revoke_cuts_one_keys_connections_and_its_key_is_refused_after() -> None:
    buf = np.random.default_rng(2).integers(0, 256, 1 << 20, dtype=np.uint8)
    regions = RegionRegistry()
    regions.add(buf.ctypes.data, buf.nbytes)
    kid1, kid2, racing = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16
    keys = {kid1: b"k" * 32, kid2: b"q" * 32, racing: b"r" * 32}

    def lookup(key_id: bytes) -> bytes | None:
        key = keys.get(key_id)
        if key_id == racing:  # the link ends while this handshake runs
            keys.pop(racing, None)
        return key

    srv = await DataServer.start("127.0.0.1", 0, lookup, registry=regions)
    try:
        one = [await asyncio.to_thread(open_stream, srv.address, keys[kid1], kid1) for _ in "ab"]
        two = await asyncio.to_thread(open_stream, srv.address, keys[kid2], kid2)
        await async_wait_until(
            lambda: srv.stats()["conns_live"] == 3, 20, "three adopted connections"
        )
        for sock in (*one, two):
            rc, data = await asyncio.to_thread(pull_rc, sock, buf.ctypes.data)
            assert rc == 0 and np.array_equal(data, buf[:4096])

        del keys[kid1]  # what LinkTable.drop_key does before it calls revoke
        assert srv.revoke(kid1) == 2
        await async_wait_until(
            lambda: srv.stats()["conns_live"] == 1, 20, "the two revoked ones to close"
        )
        assert srv.stats()["conns_revoked"] == 2
        for sock in one:
            rc, _ = await asyncio.to_thread(pull_rc, sock, buf.ctypes.data)
            assert rc == _ffi.lib.DXL_E_PEER, _ffi.err_name(rc)
        rc, data = await asyncio.to_thread(pull_rc, two, buf.ctypes.data + 4096)
        assert rc == 0 and np.array_equal(data, buf[4096:8192])  # the other key: untouched

        with pytest.raises(AuthError):  # the revoked key cannot come back
            await asyncio.to_thread(open_stream, srv.address, b"k" * 32, kid1)
        assert srv.stats()["auth_failures"] == 1
        # authenticated, but its key went during the handshake: closed, never adopted
        late = await asyncio.to_thread(open_stream, srv.address, b"r" * 32, racing)
        assert await asyncio.to_thread(closed_by_server, late)
        assert srv.stats()["conns_adopted"] == 3
        for sock in (*one, two, late):
            sock.close()
    finally:
        await srv.close()
        regions.close()


async def test_unlink_cuts_the_peers_data_connections_at_once(nodes) -> None:
    """C links to B over tcp; data connections with the link's key (here, ones C's transport
    does not own, so only B can close them) end when the link does, on unlink_clusters."""
    b = await nodes(20, 5)
    c = await nodes(30, 7)
    assert (await c.eng.link_clusters([info(b.eng)]))[0] == S.LLM_SUCCESS
    link = c.eng._links.get(20)  # test-only access: the link's data key, as B holds it
    assert link is not None
    key = b.eng._links.key_for(link.key_id)
    assert key is not None
    address = ("127.0.0.1", b.eng._listener.data_port)
    socks = [await asyncio.to_thread(open_stream, address, key, link.key_id) for _ in "ab"]
    for sock in socks:
        rc, _ = await asyncio.to_thread(pull_rc, sock, b.buf.addrs[0])
        assert rc == 0
    revoked = b.data_stats["conns_revoked"]

    _, rets = await c.eng.unlink_clusters([info(b.eng)])
    assert rets == [S.LLM_SUCCESS]
    await async_wait_until(
        lambda: b.data_stats["conns_revoked"] >= revoked + len(socks), 20, "B to revoke them"
    )
    for sock in socks:
        assert await asyncio.to_thread(closed_by_server, sock)
        sock.close()
    await async_wait_until(
        lambda: b.data_stats["conns_live"] == 0, 20, "B's data connections to end"
    )
    with pytest.raises(AuthError):
        await asyncio.to_thread(open_stream, address, key, link.key_id)


async def test_connections_over_the_per_key_limit_are_refused(caplog) -> None:
    buf = np.random.default_rng(4).integers(0, 256, 1 << 16, dtype=np.uint8)
    regions = RegionRegistry()
    regions.add(buf.ctypes.data, buf.nbytes)
    kid, key = b"\x05" * 16, b"s" * 32
    srv = await DataServer.start("127.0.0.1", 0, {kid: key}.get, registry=regions)
    cap = _ffi.lib.DXL_TCP_MAX_CONNS_PER_TAG
    socks: list[socket.socket] = []
    try:
        for _ in range(cap):
            socks.append(await asyncio.to_thread(open_stream, srv.address, key, kid))
        await async_wait_until(
            lambda: srv.stats()["conns_live"] == cap, 20, "the allowed connections"
        )
        with caplog.at_level("WARNING", logger="dxl"):
            for _ in range(3):  # authenticated, then refused by the native limit and closed
                extra = await asyncio.to_thread(open_stream, srv.address, key, kid)
                assert await asyncio.to_thread(closed_by_server, extra)
                extra.close()
            await async_wait_until(lambda: srv.stats()["conns_refused"] == 3, 20, "three refusals")
        assert caplog.text.count("refused a connection") == 3
        assert srv.stats()["conns_live"] == cap
        rc, data = await asyncio.to_thread(pull_rc, socks[0], buf.ctypes.data)
        assert rc == 0 and np.array_equal(data, buf[:4096])  # the others: served as before
    finally:
        for sock in socks:
            sock.close()
        await srv.close()
        regions.close()
