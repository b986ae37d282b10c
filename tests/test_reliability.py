"""Defined cancellation, close with transfers in flight, thread use of the sync API, and an
endurance run whose file descriptors, threads and memory must stay flat."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest
from waiting import async_wait_until, ops_inflight, start_until_in_flight

import dxl
from dxl.testing import KVBuffers

pytestmark = [pytest.mark.multiproc, pytest.mark.cma]

S = dxl.LLMStatusCode
P_ID, D_ID = 1, 2
BIG_TENSORS, BIG_BLOCKS, BIG_BB = 32, 64, 64 << 10  # 128 MiB on each side


@pytest.fixture
def big_prefill(make_peer):
    peer = make_peer(P_ID)
    peer.call(
        "register",
        name="kv",
        num_tensors=BIG_TENSORS,
        num_blocks=BIG_BLOCKS,
        block_bytes=BIG_BB,
        seed=4,
        model_id=0,
    )
    return peer


async def test_cancel_returns_only_after_the_copy_stopped(big_prefill):
    buf = KVBuffers(BIG_TENSORS, BIG_BLOCKS, BIG_BB, fill=False)
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER) as eng:
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
        await eng.link_clusters([big_prefill.cluster_info()])
        blocks = list(range(BIG_BLOCKS))
        for _ in range(5):
            [task] = await start_until_in_flight(
                lambda: [
                    asyncio.create_task(
                        eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, blocks, blocks)
                    )
                ],
                "a pull of the whole cache",
            )
            task.cancel()  # lands while the native copy runs
            with pytest.raises(asyncio.CancelledError):
                await task
            assert ops_inflight() == 0  # the cancel came through only after the copy stopped

        # asyncio.timeout around a call behaves the same way: it expires mid-copy
        timeouts: list[asyncio.Timeout] = []

        async def pull_under_a_timeout() -> None:
            async with asyncio.timeout(None) as cm:
                timeouts.append(cm)
                await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, blocks, blocks)

        [task] = await start_until_in_flight(
            lambda: [asyncio.create_task(pull_under_a_timeout())], "a pull under asyncio.timeout"
        )
        timeouts[-1].reschedule(asyncio.get_running_loop().time())  # expires now
        with pytest.raises(TimeoutError):
            await task
        assert ops_inflight() == 0
        # and the engine is fine afterwards
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [3], [3])
        assert buf.matches(range(BIG_TENSORS), [3], 4, range(BIG_TENSORS), [3])


async def test_close_with_transfers_in_flight(big_prefill):
    buf = KVBuffers(BIG_TENSORS, BIG_BLOCKS, BIG_BB, fill=False)
    eng = dxl.Engine(D_ID, dxl.LLMRole.DECODER)
    await eng.start()
    cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
    await eng.link_clusters([big_prefill.cluster_info()])
    blocks = list(range(BIG_BLOCKS))
    pulls = await start_until_in_flight(
        lambda: [
            asyncio.create_task(eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, blocks, blocks))
            for _ in range(4)
        ],
        "a pull of the whole cache",
    )
    await eng.close()  # returns (under pytest's timeout) with pulls in flight: it cuts them off
    for result in await asyncio.gather(*pulls, return_exceptions=True):
        # each either finished before close, or failed with a clear status
        assert result is None or isinstance(result, (dxl.LLMException, RuntimeError)), result
    assert ops_inflight() == 0
    with pytest.raises(RuntimeError, match="not running"):
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [0], [0])


def test_sync_api_from_many_threads(make_peer):
    """The facade serialises calls from any thread onto its loop: concurrent use is safe."""
    peer = make_peer(P_ID)
    peer.call(
        "register", name="kv", num_tensors=4, num_blocks=64, block_bytes=4096, seed=6, model_id=0
    )
    dd = dxl.LLMDataDist(dxl.LLMRole.DECODER, D_ID)
    dd.init({})
    try:
        buf = KVBuffers(4, 64, 4096, fill=False)
        cache = dd.cache_manager.register_blocks_cache(buf.desc(), buf.addrs)
        assert dd.link_clusters([peer.cluster_info()])[0] == S.LLM_SUCCESS
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                for j in range(20):
                    b = (i * 8 + j) % 64
                    dd.cache_manager.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [b], [b])
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert buf.matches(range(4), range(64), 6, range(4), range(64))
    finally:
        dd.finalize()


def _resources() -> tuple[int, int, int]:
    """(open file descriptors, threads, resident KiB) of this process."""
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/statm") as f:
        rss_kib = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    return fds, threading.active_count(), rss_kib


async def test_endurance_link_and_register_cycles(make_peer, capsys):
    peer = make_peer(P_ID)
    peer.call(
        "register", name="kv", num_tensors=4, num_blocks=16, block_bytes=4096, seed=8, model_id=0
    )
    link_cycles, reg_cycles = 1000, 10_000
    # The peer's heartbeat interval (200 ms): with the default (1000 ms) here, the peer drops
    # the link once the register cycles (which send it nothing) outlast its 3 x 200 ms of
    # silence, as test_links::test_an_idle_link_survives_different_heartbeat_intervals shows.
    hb = {"dxl.HeartbeatIntervalMs": "200"}
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER, hb) as eng:
        buf = KVBuffers(4, 16, 4096, fill=False)
        info = peer.cluster_info()
        # warm up once so lazily created things (threads, caches) exist before measuring
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
        await eng.link_clusters([info])
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [0], [0])
        await eng.unlink_clusters([info])
        before = _resources()
        t0 = time.monotonic()
        for i in range(link_cycles):
            ret, _ = await eng.link_clusters([info])
            assert ret == S.LLM_SUCCESS
            if i % 10 == 0:
                await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [i % 16], [i % 16])
            await eng.unlink_clusters([info], force=i % 2 == 0)
        ret, _ = await eng.link_clusters([info])
        assert ret == S.LLM_SUCCESS
        await eng.unregister_cache(cache.cache_id)
        for i in range(reg_cycles):
            cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
            if i % 100 == 0:
                await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [1], [1])
            await eng.unregister_cache(cache.cache_id)
        await eng.unlink_clusters([info])
        elapsed = time.monotonic() - t0
        after = await async_wait_until(  # closed links finish tearing down after unlink returns
            lambda now: now[0] <= before[0] and now[1] <= before[1],
            10,
            f"file descriptors and threads back to at most {before[:2]}",
            observe=_resources,
        )
        assert buf.matches(range(4), [1], 8, range(4), [1])
        assert eng.stats()["native"]["regions_live"] == 0
    with capsys.disabled():
        print(
            f"\nendurance: {link_cycles} link/unlink + {reg_cycles} register/unregister cycles "
            f"in {elapsed:.1f} s; fds {before[0]} -> {after[0]}, threads {before[1]} -> "
            f"{after[1]}, RSS {before[2] / 1024:.1f} -> {after[2] / 1024:.1f} MiB"
        )
    assert after[0] <= before[0]
    assert after[1] <= before[1]
    assert after[2] - before[2] < 32 * 1024  # KiB: a small bound for allocator noise


async def test_shared_registrations_cycle_without_leaking(make_peer, capsys):
    """dxl.ShareRegistered: each registration opens memfds on the owner and mappings on the
    peer; unregistering must close both, however many times it happens."""
    peer = make_peer(P_ID, options={"dxl.ShareRegistered": "1"})
    cycles = 200
    peer_fds = f"/proc/{peer.proc.pid}/fd"
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER) as eng:
        buf = KVBuffers(4, 16, 16384, fill=False)
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
        assert (await eng.link_clusters([peer.cluster_info()]))[0] == S.LLM_SUCCESS
        link = eng._links.get(P_ID)
        assert link is not None
        transport: Any = link.transport  # its mapped windows are looked at below
        before = (_resources(), len(os.listdir(peer_fds)))
        for i in range(cycles):
            await peer.acall(
                "register",
                name="kv",
                num_tensors=4,
                num_blocks=16,
                block_bytes=16384,
                seed=i % 100,
                model_id=0,
            )
            assert len(transport._windows.table) >= 1  # memfds of touching tensors, mapped here
            await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [5, 6], [5, 6])
            assert buf.matches(range(4), [5, 6], i % 100, range(4), [5, 6])
            await peer.acall("unregister", name="kv")
            assert len(transport._windows.table) == 0
        after = (_resources(), len(os.listdir(peer_fds)))
    with capsys.disabled():
        print(
            f"\nshared endurance: {cycles} register/pull/unregister cycles; decoder fds "
            f"{before[0][0]} -> {after[0][0]}, prefill fds {before[1]} -> {after[1]}, "
            f"decoder RSS {before[0][2] / 1024:.1f} -> {after[0][2] / 1024:.1f} MiB"
        )
    assert after[0][0] <= before[0][0] and after[1] <= before[1]
    assert after[0][2] - before[0][2] < 32 * 1024  # KiB: the mappings were all unmapped
