"""Links: handshake identity, registry updates after linking, unregister, dead and hostile peers,
and an event loop that keeps turning under many concurrent pulls."""

from __future__ import annotations

import asyncio
import signal
import socket

import numpy as np
import pytest
from waiting import WaitTimeout, async_wait_until

import dxl
from dxl.testing import KVBuffers

pytestmark = [pytest.mark.multiproc, pytest.mark.cma]

S = dxl.LLMStatusCode
TENSORS, BLOCKS, BB = 4, 64, 4096
D_ID = 2


def start_prefill(make_peer, cluster_id, seed, **kw):
    peer = make_peer(cluster_id, **kw)
    peer.call(
        "register",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BB,
        seed=seed,
        model_id=0,
    )
    return peer


async def decoder_with_cache(options=None):
    eng = dxl.Engine(D_ID, dxl.LLMRole.DECODER, options)
    await eng.start()
    buf = KVBuffers(TENSORS, BLOCKS, BB, fill=False)
    cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
    return eng, cache, buf


async def test_wrong_cluster_id_fails_the_link(make_peer):
    peer = start_prefill(make_peer, 1, seed=1)
    info = peer.cluster_info()
    info.remote_cluster_id = 77  # the process at that address is cluster 1
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER) as eng:
        ret, rets = await eng.link_clusters([info])
        assert ret == S.LLM_LINK_FAILED and rets == [S.LLM_LINK_FAILED]
        assert eng.stats()["links"] == {}
        ret, rets = await eng.link_clusters([peer.cluster_info()])
        assert rets == [S.LLM_SUCCESS]
        ret, rets = await eng.link_clusters([peer.cluster_info()])
        assert rets == [S.LLM_ALREADY_LINK]


async def test_link_to_closed_port_fails_in_time():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the link tries it
    info = dxl.LLMClusterInfo()
    info.remote_cluster_id = 1
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info("127.0.0.1", port)
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER) as eng:
        # refused at once: a link that waited for its timeout (beyond pytest's) fails the test
        _, rets = await eng.link_clusters([info], timeout=300_000)
        assert rets == [S.LLM_LINK_FAILED]


async def test_registration_after_link_reaches_peer_before_return(make_peer):
    peer = make_peer(1)  # nothing registered yet
    eng, cache, buf = await decoder_with_cache()
    async with eng:
        assert (await eng.link_clusters([peer.cluster_info()]))[0] == S.LLM_SUCCESS
        with pytest.raises(dxl.LLMException) as err:
            await eng.pull_blocks(dxl.BlocksCacheKey(1, 0), cache, [0], [0])
        assert err.value.status_code == S.LLM_KV_CACHE_NOT_EXIST
        await peer.acall(
            "register",
            name="kv",
            num_tensors=TENSORS,
            num_blocks=BLOCKS,
            block_bytes=BB,
            seed=9,
            model_id=0,
        )  # returns after our ack
        await eng.pull_blocks(dxl.BlocksCacheKey(1, 0), cache, [3], [4])
        assert buf.matches(range(TENSORS), [4], 9, range(TENSORS), [3])
        await peer.acall("unregister", name="kv")  # returns only after we stopped using it
        with pytest.raises(dxl.LLMException) as err:
            await eng.pull_blocks(dxl.BlocksCacheKey(1, 0), cache, [3], [5])
        assert err.value.status_code == S.LLM_KV_CACHE_NOT_EXIST
        assert buf.untouched(range(TENSORS), [5])


async def test_unlink_then_relink(make_peer):
    peer = start_prefill(make_peer, 1, seed=3)
    eng, cache, buf = await decoder_with_cache()
    async with eng:
        await eng.link_clusters([peer.cluster_info()])
        _, rets = await eng.unlink_clusters([peer.cluster_info()])
        assert rets == [S.LLM_SUCCESS]
        assert eng.stats()["links"] == {}
        await async_wait_until(  # the peer drops its end when told
            lambda links: links == [],
            10,
            "the peer to drop its end of the link",
            observe=lambda: peer.acall("links"),
        )
        _, rets = await eng.unlink_clusters([peer.cluster_info()])
        assert rets == [S.LLM_NOT_YET_LINK]
        assert (await eng.link_clusters([peer.cluster_info()]))[0] == S.LLM_SUCCESS
        await eng.pull_blocks(dxl.BlocksCacheKey(1, 0), cache, [1], [1])
        assert buf.matches(range(TENSORS), [1], 3, range(TENSORS), [1])
        _, rets = await eng.unlink_clusters([peer.cluster_info()], force=True)
        assert rets == [S.LLM_SUCCESS]


async def test_killed_prefill_fails_fast_and_others_keep_working(make_peer):
    p1 = start_prefill(make_peer, 1, seed=1)
    p2 = start_prefill(make_peer, 3, seed=3)
    # the pull's own timeout is beyond pytest's: only the death of the prefill can fail it
    eng, cache, buf = await decoder_with_cache(
        {"llm.SyncKvCacheWaitTime": "300000", "dxl.HeartbeatIntervalMs": "200"}
    )
    async with eng:
        ret, _ = await eng.link_clusters([p1.cluster_info(), p2.cluster_info()])
        assert ret == S.LLM_SUCCESS
        await eng.pull_blocks(dxl.BlocksCacheKey(1, 0), cache, [0], [0])
        p1.kill(signal.SIGKILL)
        p1.proc.join(5)
        with pytest.raises(dxl.LLMException) as err:
            await eng.pull_blocks(dxl.BlocksCacheKey(1, 0), cache, [1], [1])
        assert err.value.status_code in (S.LLM_LINK_FAILED, S.LLM_NOT_YET_LINK)  # not TIMEOUT
        assert buf.untouched(range(TENSORS), [1])
        await eng.pull_blocks(dxl.BlocksCacheKey(3, 0), cache, [5, 6], [2, 3])
        assert buf.matches(range(TENSORS), [2, 3], 3, range(TENSORS), [5, 6])
        assert 1 not in eng.stats()["links"]


async def test_stopped_peer_is_noticed_by_heartbeat(make_peer):
    peer = start_prefill(make_peer, 1, seed=1)
    eng, cache, _ = await decoder_with_cache({"dxl.HeartbeatIntervalMs": "100"})
    async with eng:
        await eng.link_clusters([peer.cluster_info()])
        peer.kill(signal.SIGSTOP)
        try:
            await async_wait_until(  # polling the engine's public view, as a user would
                lambda links: 1 not in links,
                10,
                "the heartbeat to drop the link to the stopped peer",
                observe=lambda: eng.stats()["links"],
            )
            with pytest.raises(dxl.LLMException) as err:
                await eng.pull_blocks(dxl.BlocksCacheKey(1, 0), cache, [1], [1])
            assert err.value.status_code == S.LLM_NOT_YET_LINK
        finally:
            peer.kill(signal.SIGCONT)


async def test_garbage_on_the_listening_port(make_peer):
    """Random bytes, oversize frames and half-open connections never crash or stall it."""
    peer = start_prefill(make_peer, 1, seed=1)
    host, port = peer.address
    rng = np.random.default_rng(0)
    payloads = [rng.bytes(n) for n in (1, 7, 64, 4096, 100_000)]
    payloads += [
        b"\xff\xff\xff\xff" + b"x" * 16,
        b"\x00\x00\x00\x05{}}}}",
        b"\x00\x00\x00\x02[]",
        b'\x00\x00\x00\x0b{"t":"ack"}',
    ]
    for data in payloads:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(data)
    idle = socket.create_connection((host, port), timeout=5)  # says nothing at all
    try:
        eng, cache, buf = await decoder_with_cache()
        async with eng:
            ret, _ = await eng.link_clusters([peer.cluster_info()])
            assert ret == S.LLM_SUCCESS
            await eng.pull_blocks(dxl.BlocksCacheKey(1, 0), cache, [2], [2])
            assert buf.matches(range(TENSORS), [2], 1, range(TENSORS), [2])
    finally:
        idle.close()
    assert peer.proc.is_alive()


async def test_an_idle_link_survives_different_heartbeat_intervals(make_peer):
    """Nothing asks both ends to use the same dxl.HeartbeatIntervalMs: each end announces its
    interval and judges the other by it, so the peer (pinging every 200 ms) keeps a decoder
    that pings every 1000 ms (the default) while the link is idle."""
    peer = start_prefill(make_peer, 1, seed=1)  # heartbeat every 200 ms (tests/peer.py)
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER) as eng:  # default: every 1000 ms
        assert (await eng.link_clusters([peer.cluster_info()]))[0] == S.LLM_SUCCESS
        # Idle time is the thing under test: the wait returns early only if the link drops;
        # 3 s is 3 of our intervals and 15 of the peer's.
        with pytest.raises(WaitTimeout):
            await async_wait_until(
                lambda links: 1 not in links,
                3.0,
                "an idle link to be dropped",
                observe=lambda: eng.stats()["links"],
            )


async def test_256_concurrent_pulls_leave_the_loop_turning(make_peer):
    """Pulls started together do not run back to back on the loop: it keeps turning (other
    tasks run) while some of them are done and others still copying, off the loop. How long
    the loop stalls under such a burst is a benchmark figure, not a unit-test bound:
    ``dxl bench --overhead`` reports it beside a baseline measured in the same run."""
    peer = start_prefill(make_peer, 1, seed=5)
    n = 256
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER) as eng:
        buf = KVBuffers(TENSORS, 2 * n, BB, fill=False)  # own destination blocks per request
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
        await eng.link_clusters([peer.cluster_info()])
        rng = np.random.default_rng(1)
        src = rng.integers(0, BLOCKS, size=(n, 2))
        pulls = [
            asyncio.create_task(
                eng.pull_blocks(
                    dxl.BlocksCacheKey(1, 0), cache, src[i].tolist(), [2 * i, 2 * i + 1]
                )
            )
            for i in range(n)
        ]
        seen: list[int] = []  # pulls done, at each turn of the loop while any still ran

        async def watch() -> None:
            while not all(p.done() for p in pulls):
                seen.append(sum(p.done() for p in pulls))
                await asyncio.sleep(0)  # one turn of the loop

        await asyncio.gather(watch(), *pulls)
        assert any(0 < k < n for k in seen), (
            f"the loop never turned between the first and the last of {n} pulls: {seen}"
        )
        assert buf.matches(range(TENSORS), np.arange(2 * n), 5, range(TENSORS), src.ravel())
        assert eng.stats()["pull"]["ops"] == n


def test_features_report_cma():
    feats = dxl.features()
    assert feats["cma"] is True
    assert feats["version"] == dxl.__version__
