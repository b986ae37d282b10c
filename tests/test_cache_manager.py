"""The rest of the v2 CacheManager: pool allocation, key consumption, local copies, and the
layer-wise transfer_cache_async push, across two processes where data moves."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import dxl
from dxl.testing import KVBuffers

pytestmark = [pytest.mark.multiproc, pytest.mark.cma]

S = dxl.LLMStatusCode
U = dxl.UINT64_MAX
TENSORS, BATCHES, STRIDE = 4, 4, 4096
P_ID, D_ID = 1, 2
ALL = list(range(TENSORS))
POOL = {"llm.HostMemPoolConfig": '{"memory_size": 8388608, "page_shift": 12}'}


def desc(num_tensors=TENSORS, units=BATCHES, unit_bytes=STRIDE, placement=dxl.Placement.HOST):
    return dxl.CacheDesc(num_tensors, [units, unit_bytes // 2], dxl.DataType.DT_FLOAT16, placement)


async def decoder(peer, options=None):
    eng = dxl.Engine(D_ID, dxl.LLMRole.DECODER, options)
    await eng.start()
    assert (await eng.link_clusters([peer.cluster_info()]))[0] == S.LLM_SUCCESS
    return eng


async def test_pull_consumes_keys_of_allocated_caches(make_peer):
    peer = make_peer(P_ID, options=POOL)
    cid = peer.call(
        "allocate",
        name="kv",
        contiguous=True,
        num_tensors=TENSORS,
        num_blocks=BATCHES,
        block_bytes=STRIDE,
        seed=7,
        keys=[(10, 0, U), (11, 0, U), (U, 0, 3)],
    )
    assert cid == 1  # cache ids start at 1: samples hard-code CacheKeyByIdAndIndex(..., 1, 0)
    buf = KVBuffers(TENSORS, BATCHES, STRIDE, fill=False)
    async with await decoder(peer) as eng:
        cache = await eng.register_cache(buf.desc(), buf.addrs)
        await eng.pull_cache(dxl.CacheKey(P_ID, 10), cache, 0)
        assert buf.matches(ALL, [0], 7, ALL, [0])
        with pytest.raises(dxl.LLMException) as err:  # consumed by the first pull
            await eng.pull_cache(dxl.CacheKey(P_ID, 10), cache, 1)
        assert err.value.status_code == S.LLM_KV_CACHE_NOT_EXIST
        # layer-wise: the key goes once every tensor of the batch was pulled
        await eng.pull_cache(
            dxl.CacheKey(P_ID, 11),
            cache,
            1,
            src_layer_range=range(0, 1),
            dst_layer_range=range(0, 1),
        )
        await eng.pull_cache(
            dxl.CacheKey(P_ID, 11),
            cache,
            1,
            src_layer_range=range(1, 2),
            dst_layer_range=range(1, 2),
        )
        assert buf.matches(ALL, [1], 7, ALL, [1])
        with pytest.raises(dxl.LLMException):
            await eng.pull_cache(dxl.CacheKey(P_ID, 11), cache, 1)
        # prefix keys are never consumed
        for batch in (2, 3):
            await eng.pull_cache(dxl.CacheKey(P_ID, U, 0, 3), cache, batch)
        assert buf.matches(ALL, [2, 3], 7, ALL, [2, 2])
        # deallocation waits for the remaining (prefix) key; removing it frees the memory
        assert await peer.acall("deallocate", name="kv") == []
        assert peer.call("pool")["live"] == TENSORS
        await eng.pull_cache(dxl.CacheKeyByIdAndIndex(P_ID, cid, 2), cache, 0)
        await peer.acall("remove_key", key=[U, 0, 3])
        assert peer.call("pool") == {"used": 0, "live": 0}
        with pytest.raises(dxl.LLMException) as err:
            await eng.pull_cache(dxl.CacheKeyByIdAndIndex(P_ID, cid, 2), cache, 0)
        assert err.value.status_code == S.LLM_KV_CACHE_NOT_EXIST


async def test_remote_cache_accessible_mode_keeps_keys(make_peer):
    peer = make_peer(P_ID, options={**POOL, "llm.EnableRemoteCacheAccessible": "1"})
    peer.call(
        "allocate",
        name="kv",
        contiguous=True,
        num_tensors=TENSORS,
        num_blocks=BATCHES,
        block_bytes=STRIDE,
        seed=7,
        keys=[(10, 0, U)],
    )
    buf = KVBuffers(TENSORS, BATCHES, STRIDE, fill=False)
    async with await decoder(peer) as eng:
        cache = await eng.register_cache(buf.desc(), buf.addrs)
        await eng.pull_cache(dxl.CacheKey(P_ID, 10), cache, 0)
        await eng.pull_cache(dxl.CacheKey(P_ID, 10), cache, 1)
        assert buf.matches(ALL, [0, 1], 7, ALL, [0, 0])


async def test_allocation_rules():
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT) as eng:
        with pytest.raises(dxl.LLMException, match="pool") as err:
            await eng.allocate_cache(desc())
        assert err.value.status_code == S.LLM_FEATURE_NOT_ENABLED
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT, POOL) as eng:
        with pytest.raises(dxl.LLMException) as err:
            await eng.allocate_cache(desc(placement=dxl.Placement.DEVICE))
        assert err.value.status_code == S.LLM_FEATURE_NOT_ENABLED
        with pytest.raises(dxl.LLMException) as err:
            await eng.allocate_cache(desc(units=4, unit_bytes=1 << 20))  # 16 MiB > 8 MiB pool
        assert err.value.status_code == S.LLM_OUT_OF_MEMORY
        with pytest.raises(dxl.LLMException) as err:
            await eng.allocate_cache(desc(), [dxl.CacheKey(P_ID, 1), dxl.CacheKey(P_ID, 1)])
        assert err.value.status_code == S.LLM_PARAM_INVALID
        with pytest.raises(TypeError):
            await eng.allocate_cache(None)  # type: ignore[arg-type]
        pool = eng._registrations.pool
        assert pool is not None
        assert pool.used == 0  # every refusal left the pool as it was
        cache = await eng.allocate_cache(desc(), [dxl.CacheKey(P_ID, 1)])
        blocks = await eng.allocate_blocks_cache(desc(), dxl.BlocksCacheKey(P_ID, 0))
        assert cache.remote_accessible and not cache.is_blocks_cache and blocks.is_blocks_cache
        assert (cache.cache_id, blocks.cache_id) == (1, 2)
        with pytest.raises(dxl.LLMException, match="model_id=0"):
            await eng.allocate_blocks_cache(desc(), dxl.BlocksCacheKey(P_ID, 0))
        with pytest.raises(dxl.LLMException, match="deallocate_blocks_cache") as err:
            await eng.deallocate_cache(blocks)
        assert err.value.status_code == S.LLM_PARAM_INVALID
        await eng.deallocate_blocks_cache(blocks)
        assert blocks.tensor_addrs == []
        await eng.deallocate_cache(cache)  # key 1 still bound: memory stays
        assert pool.live_count == TENSORS
        await eng.remove_cache_key(dxl.CacheKey(P_ID, 1))
        assert pool.used == 0
        user = KVBuffers(TENSORS, BATCHES, STRIDE)
        registered = await eng.register_cache(user.desc(), user.addrs)
        await eng.deallocate_cache(registered)  # user memory: a no-op
        assert eng.stats()["caches"] == 1


async def test_local_copies():
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT) as eng:
        a, b = KVBuffers(TENSORS, BATCHES, STRIDE, seed=1), KVBuffers(TENSORS, BATCHES, STRIDE)
        ca = await eng.register_cache(a.desc(), a.addrs)
        cb = await eng.register_cache(b.desc(), b.addrs)
        await eng.copy_cache(cb, ca, dst_batch_index=3, src_batch_index=1)
        assert b.matches(ALL, [3], 1, ALL, [1])
        assert b.untouched(ALL, [0, 1, 2])
        await eng.copy_cache(cb, ca, 0, 2, offset=1024, size=512)
        head = b.blocks(0)[0]
        assert (head[128:192] == a.blocks(0)[2][128:192]).all()
        assert (head[:128] == KVBuffers(TENSORS, BATCHES, STRIDE).blocks(0)[0][:128]).all()
        with pytest.raises(dxl.LLMException):
            await eng.copy_cache(cb, ca, 0, 0, offset=STRIDE)
        kv = KVBuffers(TENSORS, 8, 1024, seed=4)
        ck = await eng.register_blocks_cache(kv.desc(), kv.addrs)
        await eng.copy_blocks(ck, {0: [5, 6], 1: [7]})
        assert kv.matches(ALL, [5, 6, 7], 4, ALL, [0, 0, 1])
        with pytest.raises(TypeError):
            await eng.copy_blocks(ck, {0: 5})  # type: ignore[dict-item]
        with pytest.raises(dxl.LLMException):
            await eng.copy_blocks(ck, {0: [8]})
        # swap out to a CPU cache that is not registered, and back in
        cpu = KVBuffers(TENSORS, 4, 1024, fill=False)
        cpu_cache = dxl.Cache.create_cpu_cache(cpu.desc(), cpu.addrs)
        await eng.swap_blocks(ck, cpu_cache, {2: 0, 3: 1})
        assert cpu.matches(ALL, [0, 1], 4, ALL, [2, 3])
        await eng.swap_blocks(cpu_cache, ck, {0: 4})
        assert kv.matches(ALL, [4], 4, ALL, [2])
        with pytest.raises(AttributeError):
            await eng.swap_blocks(None, ck, {0: 0})  # type: ignore[arg-type]
        with pytest.raises(dxl.LLMException):
            await eng.swap_blocks(ca, ck, {0: 0})


class Layers(dxl.LayerSynchronizer):
    """Releases layer l when the test sets ready[l]; refuses layers in ``refuse``."""

    def __init__(self, num_layers: int, refuse: frozenset[int] = frozenset()) -> None:
        self.ready = [threading.Event() for _ in range(num_layers)]
        self.asked: list[int] = []
        self.refuse = refuse

    def synchronize_layer(self, layer_index: int, timeout_in_millis: int | None) -> bool:
        self.asked.append(layer_index)
        self.ready[layer_index].wait(10)
        return layer_index not in self.refuse


async def test_transfer_cache_async_layer_by_layer(make_peer):
    layers, blocks, bb = 3, 8, 1024
    peer = make_peer(D_ID, role="DECODER")
    peer.call(
        "register",
        name="kv",
        num_tensors=2 * layers,
        num_blocks=blocks,
        block_bytes=bb,
        seed=0,
        model_id=0,
        fill=False,
    )
    src = KVBuffers(2 * layers, blocks, bb, seed=9)
    everything = list(range(2 * layers))
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT) as eng:
        cache = await eng.register_blocks_cache(src.desc(), src.addrs)
        info = peer.cluster_info()
        assert (await eng.link_clusters([info]))[0] == S.LLM_SUCCESS
        sync = Layers(layers)
        cfg = dxl.TransferWithCacheKeyConfig(
            dxl.BlocksCacheKey(D_ID, 0), range(0, layers), range(0, layers)
        )
        task = await eng.transfer_cache_async(cache, sync, [cfg], [1, 2], [6, 7])
        sync.ready[0].set()
        for layer in range(1, layers):  # nothing beyond a released layer moves
            sync.ready[layer].set()
        assert await task.wait_async() == [S.LLM_SUCCESS]
        assert task.synchronize() == S.LLM_SUCCESS
        args = dict(
            tensors=everything,
            dst_blocks=[6, 7],
            src_seed=9,
            src_tensors=everything,
            src_blocks=[1, 2],
        )
        assert await peer.acall("matches", name="kv", args=args)

        # raw destination addresses (TransferConfig) for layers 1..2 into peer layers 0..1
        addrs = peer.call("addrs", name="kv")
        tcfg = dxl.TransferConfig(D_ID, addrs[:4], range(1, 3))
        sync = Layers(layers, refuse=frozenset({2}))
        for ev in sync.ready:
            ev.set()
        task = await eng.transfer_cache_async(cache, sync, [tcfg], [5], [0])
        assert await task.wait_async() == [S.LLM_PARAM_INVALID]  # layer 2 was refused
        assert sync.asked == [1, 2]
        args = dict(tensors=[0, 1], dst_blocks=[0], src_seed=9, src_tensors=[2, 3], src_blocks=[5])
        assert await peer.acall("matches", name="kv", args=args)
        assert await peer.acall("untouched", name="kv", tensors=[2, 3], blocks=[0])

        # a raw address outside what the peer registered fails that config, nothing moves
        bad = dxl.TransferConfig(D_ID, [addrs[0] + blocks * bb, addrs[1]], range(0, 1))
        sync = Layers(layers)
        for ev in sync.ready:
            ev.set()
        task = await eng.transfer_cache_async(cache, sync, [bad], [0], [1])
        assert await task.wait_async() == [S.LLM_KV_CACHE_NOT_EXIST]
        assert await peer.acall("untouched", name="kv", tensors=everything, blocks=[1])

        # no block indices: one stride of the blocks cache (block 0) per tensor of the layer,
        # as the reference's cache entry of a blocks cache is one block; the rest untouched
        sync = Layers(layers)
        for ev in sync.ready:
            ev.set()
        first = dxl.TransferWithCacheKeyConfig(
            dxl.BlocksCacheKey(D_ID, 0), range(2, 3), range(2, 3)
        )
        before = peer.call("read", name="kv", tensors=[4, 5], blocks=list(range(1, blocks)))
        task = await eng.transfer_cache_async(cache, sync, [first])
        assert await task.wait_async() == [S.LLM_SUCCESS]
        args = dict(tensors=[4, 5], dst_blocks=[0], src_seed=9, src_tensors=[4, 5], src_blocks=[0])
        assert await peer.acall("matches", name="kv", args=args)
        assert peer.call("read", name="kv", tensors=[4, 5], blocks=list(range(1, blocks))) == before

        with pytest.raises(TypeError):
            await eng.transfer_cache_async(cache, None, [cfg], [1], [1])  # type: ignore[arg-type]
        with pytest.raises(dxl.LLMException):
            await eng.transfer_cache_async(cache, sync, [cfg], [1, 2], [1])
        with pytest.raises(TypeError):
            await eng.transfer_cache_async(None, sync, [cfg])  # type: ignore[arg-type]


def test_rank_table_arguments_and_v1_entry_points_are_checked():
    dd = dxl.LLMDataDist(dxl.LLMRole.PROMPT, 5)
    with pytest.raises(RuntimeError, match="not initialized"):
        dd.link("c", {5: 0, 2: 1}, "{}")
    dd.init({})
    try:
        with pytest.raises(dxl.LLMException) as err:
            dd.link("", {5: 0, 2: 1}, "{}")
        assert err.value.status_code == S.LLM_PARAM_INVALID
        with pytest.raises(TypeError):
            dd.link("c", {5: "0"}, "{}")  # type: ignore[dict-item]
        with pytest.raises(dxl.LLMException) as err:
            dd.link("c", {5: 1, 2: 0}, "{}")
        assert err.value.status_code == S.LLM_PARAM_INVALID
        table = {
            "server_list": [
                {
                    "host_ip": "127.0.0.1",
                    "device": [
                        {"device_id": "0", "rank_id": "0"},
                        {"device_id": "1", "rank_id": "1"},
                    ],
                }
            ]
        }
        for bad, why in (
            ("{", "not JSON"),
            ("[]", "server_list"),
            (json.dumps({"server_list": [{"device": [{"rank_id": "0"}]}]}), "address"),
            (
                json.dumps(
                    {
                        "server_list": [
                            {"host_ip": "x", "device": [{"rank_id": "0"}, {"rank_id": "1"}]}
                        ]
                    }
                ),
                "not an IP",
            ),
        ):
            with pytest.raises(dxl.LLMException, match=why) as err:
                dd.link("c", {5: 0, 2: 1}, bad)
            assert err.value.status_code == S.LLM_PARAM_INVALID
        with pytest.raises(dxl.LLMException, match="rank 7 of cluster 2") as err:
            dd.link("c", {5: 0, 2: 7}, json.dumps(table))
        with pytest.raises(dxl.LLMException, match="cluster id 5 is not a member") as err:
            dd.link("c", {1: 0, 2: 1}, json.dumps(table))
        assert dd.engine.listen_address is None  # every refusal left the engine as it was
        assert dd.query_register_mem_status(1) == dxl.RegisterMemStatus.FAILED  # no comm 1
        for call in (
            lambda: dd.check_link_status(1),
            lambda: dd.kv_cache_manager,
            lambda: dd.unlink(1),
        ):
            with pytest.raises(dxl.LLMException) as err:
                call()
            assert err.value.status_code == S.LLM_PARAM_INVALID
    finally:
        dd.finalize()


async def test_pulls_from_allocated_caches_use_the_shared_pool(make_peer):
    """A same-host peer's pool is mapped at link time: pulls and pushes into caches it
    allocated are memcpy (transport "cma+shm"), with the same safety as cma."""
    peer = make_peer(P_ID, options=POOL)
    peer.call(
        "allocate",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=16,
        block_bytes=4096,
        seed=3,
        model_id=0,
    )
    buf = KVBuffers(TENSORS, 16, 4096, fill=False)
    async with await decoder(peer) as eng:
        assert eng.stats()["links"][P_ID]["transport"] == "cma+shm"
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [3, 4, 9], [0, 1, 2])
        assert buf.matches(ALL, [0, 1, 2], 3, ALL, [3, 4, 9])
        await eng.push_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [0], [15])
        args = dict(tensors=ALL, dst_blocks=[15], src_seed=3, src_tensors=ALL, src_blocks=[3])
        assert await peer.acall("matches", name="kv", args=args)
        await peer.acall("deallocate", name="kv")
        with pytest.raises(dxl.LLMException) as err:
            await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [3], [5])
        assert err.value.status_code == S.LLM_KV_CACHE_NOT_EXIST
        assert buf.untouched(ALL, [5])


async def test_shared_pool_of_a_killed_peer_is_never_read(make_peer):
    peer = make_peer(P_ID, options=POOL)
    peer.call(
        "allocate",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=16,
        block_bytes=4096,
        seed=3,
        model_id=0,
    )
    buf = KVBuffers(TENSORS, 16, 4096, fill=False)
    async with await decoder(peer) as eng:
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
        link = eng._links.get(P_ID)
        peer.kill()
        peer.proc.join(5)
        # call the transport directly: the engine would also see the closed control link
        from dxl.memory.plan import block_pieces

        remote = link.registry.blocks_by_model[0]
        pieces = block_pieces(
            np.asarray(buf.addrs, dtype=np.uint64),
            remote.layout.addrs,
            np.array([0]),
            np.array([1]),
            4096,
        )
        with pytest.raises(dxl._ffi.NativeError, match="DXL_E_SRCH"):
            link.transport.read(pieces)
        del cache
