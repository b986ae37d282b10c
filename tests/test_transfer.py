"""Byte-exact pull_blocks / push_blocks between a prefill process and this (decode) process."""

from __future__ import annotations

import numpy as np
import pytest

import dxl
from dxl.testing import KVBuffers

pytestmark = [pytest.mark.multiproc, pytest.mark.cma]

LAYERS = 4
TENSORS = 2 * LAYERS
BLOCKS = 32
BLOCK_BYTES = 4096
P_ID, D_ID = 1, 2


def register_prefill(peer, name="kv", seed=7, model_id=0, **kw):
    return peer.call(
        "register",
        name=name,
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BLOCK_BYTES,
        seed=seed,
        model_id=model_id,
        **kw,
    )


async def linked_decoder(peer, **options):
    eng = dxl.Engine(D_ID, dxl.LLMRole.DECODER, options or None)
    await eng.start()
    ret, rets = await eng.link_clusters([peer.cluster_info()])
    assert ret == dxl.LLMStatusCode.LLM_SUCCESS, rets
    return eng


@pytest.fixture
def prefill(make_peer):
    peer = make_peer(P_ID)
    register_prefill(peer)
    return peer


async def test_pull_blocks_is_byte_exact(prefill):
    dst = KVBuffers(TENSORS, BLOCKS, BLOCK_BYTES, seed=99)
    async with await linked_decoder(prefill) as eng:
        cache = await eng.register_blocks_cache(dst.desc(), dst.addrs)
        src_blocks, dst_blocks = [5, 6, 7, 30, 2], [0, 1, 2, 9, 31]
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, src_blocks, dst_blocks)
        tensors = list(range(TENSORS))
        assert dst.matches(tensors, dst_blocks, 7, tensors, src_blocks)
        others = sorted(set(range(BLOCKS)) - set(dst_blocks))
        assert dst.untouched(tensors, others)
        stats = eng.stats()
        # the prefill's memory is shared by default (dxl.ShareRegistered unset, nothing pinned)
        assert stats["links"][P_ID]["transport"] == "cma+shm"
        assert stats["pull"]["ops"] == 1
        assert stats["pull"]["bytes"] == TENSORS * len(src_blocks) * BLOCK_BYTES


async def test_pull_blocks_layer_ranges(prefill):
    dst = KVBuffers(TENSORS, BLOCKS, BLOCK_BYTES, seed=99)
    async with await linked_decoder(prefill) as eng:
        cache = await eng.register_blocks_cache(dst.desc(), dst.addrs)
        await eng.pull_blocks(
            dxl.BlocksCacheKey(P_ID, 0),
            cache,
            [3, 4],
            [10, 11],
            src_layer_range=range(1, 3),
            dst_layer_range=range(2, 4),
        )
        # source layers 1,2 (tensors 2..5) land in destination layers 2,3 (tensors 4..7)
        assert dst.matches([4, 5, 6, 7], [10, 11], 7, [2, 3, 4, 5], [3, 4])
        assert dst.untouched([0, 1, 2, 3], [10, 11])
        # one tensor per layer: layer 5 is tensor 5
        await eng.pull_blocks(
            dxl.BlocksCacheKey(P_ID, 0),
            cache,
            [8],
            [12],
            src_layer_range=range(5, 6),
            dst_layer_range=range(0, 1),
            tensor_num_per_layer=1,
        )
        assert dst.matches([0], [12], 7, [5], [8])
        assert dst.untouched(list(range(1, TENSORS)), [12])


async def test_pull_many_blocks_coalesces(prefill):
    dst = KVBuffers(TENSORS, BLOCKS, BLOCK_BYTES, seed=99)
    async with await linked_decoder(prefill) as eng:
        cache = await eng.register_blocks_cache(dst.desc(), dst.addrs)
        rng = np.random.default_rng(3)
        src = rng.permutation(BLOCKS).tolist()
        dst_ids = list(range(BLOCKS))
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, src, dst_ids)
        tensors = list(range(TENSORS))
        assert dst.matches(tensors, dst_ids, 7, tensors, src)
        # consecutive runs merge: an identity pull of all blocks is one piece per tensor
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, dst_ids, dst_ids)
        assert dst.matches(tensors, dst_ids, 7, tensors, dst_ids)
        assert eng.stats()["pull"]["pieces"] <= TENSORS * BLOCKS + TENSORS


async def test_push_blocks_is_byte_exact(make_peer):
    peer = make_peer(P_ID)
    register_prefill(peer, seed=7, fill=False)  # the receiving side starts zeroed
    src = KVBuffers(TENSORS, BLOCKS, BLOCK_BYTES, seed=42)
    async with await linked_decoder(peer) as eng:
        cache = await eng.register_blocks_cache(src.desc(), src.addrs)
        await eng.push_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [1, 2, 3], [20, 21, 0])
        tensors = list(range(TENSORS))
        args = dict(
            tensors=tensors,
            dst_blocks=[20, 21, 0],
            src_seed=42,
            src_tensors=tensors,
            src_blocks=[1, 2, 3],
        )
        assert peer.call("matches", name="kv", args=args)
        assert peer.call("untouched", name="kv", tensors=tensors, blocks=[4, 5, 19, 22])
        # layer-wise push: local layer 0 -> remote layer 3 only
        await eng.push_blocks(
            dxl.BlocksCacheKey(P_ID, 0),
            cache,
            [9],
            [9],
            src_layer_range=range(0, 1),
            dst_layer_range=range(3, 4),
        )
        args = dict(tensors=[6, 7], dst_blocks=[9], src_seed=42, src_tensors=[0, 1], src_blocks=[9])
        assert peer.call("matches", name="kv", args=args)
        assert peer.call("untouched", name="kv", tensors=[0, 1, 2, 3, 4, 5], blocks=[9])
        assert eng.stats()["push"]["ops"] == 2


async def test_symmetric_link_lets_the_listener_push(make_peer):
    """The side that accepted the link may push into the side that opened it."""
    peer = make_peer(P_ID)
    register_prefill(peer, seed=5)
    dst = KVBuffers(TENSORS, BLOCKS, BLOCK_BYTES, fill=False)
    async with await linked_decoder(peer) as eng:
        await eng.register_blocks_cache(
            dst.desc(), dst.addrs, dxl.BlocksCacheKey(D_ID, 3), remote_accessible=True
        )
        await peer.acall(
            "push", name="kv", cluster_id=D_ID, model_id=3, src_blocks=[0, 1], dst_blocks=[7, 8]
        )
        tensors = list(range(TENSORS))
        assert dst.matches(tensors, [7, 8], 5, tensors, [0, 1])
        assert dst.untouched(tensors, [0, 6, 9])


def test_sync_api_pull_blocks(prefill):
    """The LLM-DataDist facade runs the same engine: the reference's sample flow."""
    dd = dxl.LLMDataDist(dxl.LLMRole.DECODER, D_ID)
    cfg = dxl.LLMConfig()
    cfg.device_id = 0
    dd.init(cfg.generate_options())
    try:
        dst = KVBuffers(TENSORS, BLOCKS, BLOCK_BYTES, seed=1)
        cm = dd.cache_manager
        cache = cm.register_blocks_cache(dst.desc(), dst.addrs, dxl.BlocksCacheKey(D_ID, 0))
        ret, rets = dd.link_clusters([prefill.cluster_info()], 5000)
        assert ret == dxl.LLMStatusCode.LLM_SUCCESS
        assert rets == [dxl.LLMStatusCode.LLM_SUCCESS]
        cm.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 2])
        tensors = list(range(TENSORS))
        assert dst.matches(tensors, [0, 2], 7, tensors, [0, 1])
        ret, _ = dd.unlink_clusters([prefill.cluster_info()], 5000)
        assert ret == dxl.LLMStatusCode.LLM_SUCCESS
        with pytest.raises(dxl.LLMException) as err:
            cm.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [0], [0])
        assert err.value.status_code == dxl.LLMStatusCode.LLM_NOT_YET_LINK
        cm.unregister_cache(cache.cache_id)
    finally:
        dd.finalize()
    with pytest.raises(RuntimeError, match="not initialized"):
        dd.link_clusters([prefill.cluster_info()])


def test_sync_api_single_instance_rule():
    a = dxl.LLMDataDist(dxl.LLMRole.PROMPT, 11)
    b = dxl.LLMDataDist(dxl.LLMRole.PROMPT, 12)
    a.init({})
    try:
        with pytest.raises(dxl.LLMException) as err:
            b.init({})
        assert err.value.status_code == dxl.LLMStatusCode.LLM_FAILED
    finally:
        a.finalize()
    b.init({})
    b.finalize()
