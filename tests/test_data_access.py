"""Who may touch which memory through an engine's tcp data server.

Several engines in one process (each with its own region registry and data server), linked to
each other over tcp on loopback: a data server serves its own engine's memory only, even to a
client holding a valid data key of one of its links.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

import dxl
from dxl import _ffi
from dxl.memory.plan import Pieces
from dxl.testing import KVBuffers

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


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Wait until ``predicate()`` holds (polled on the loop), or fail after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


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
