"""Contiguous caches and CacheKeys across two processes: pull_cache, push_cache,
contiguous -> blocks pull_blocks, key binding rules, and their documented errors."""

from __future__ import annotations

from typing import Any

import pytest

import dxl
from dxl.testing import KVBuffers

pytestmark = [pytest.mark.multiproc, pytest.mark.cma]

S = dxl.LLMStatusCode
U = dxl.UINT64_MAX
TENSORS, BATCHES, STRIDE = 4, 4, 8192
P_ID, D_ID = 1, 2
ALL = list(range(TENSORS))


@pytest.fixture
def prefill(make_peer):
    peer = make_peer(P_ID)
    # contiguous cache id 1: batch 0 <- req 10, batch 1 unused, batch 2 <- prefix 5
    peer.call(
        "register",
        name="kv",
        contiguous=True,
        num_tensors=TENSORS,
        num_blocks=BATCHES,
        block_bytes=STRIDE,
        seed=7,
        keys=[(10, 0, U), (U, 0, U), (U, 0, 5)],
    )
    return peer


async def linked(peer, buf, blocks=False, **kw):
    eng = dxl.Engine(D_ID, dxl.LLMRole.DECODER, kw or None)
    await eng.start()
    if blocks:
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
    else:
        cache = await eng.register_cache(buf.desc(), buf.addrs)
    assert (await eng.link_clusters([peer.cluster_info()]))[0] == S.LLM_SUCCESS
    return eng, cache


async def test_pull_cache_by_key_and_by_id(prefill):
    buf = KVBuffers(TENSORS, BATCHES, STRIDE, fill=False)
    eng, cache = await linked(prefill, buf)
    async with eng:
        await eng.pull_cache(dxl.CacheKey(P_ID, 10), cache, batch_index=3)
        assert buf.matches(ALL, [3], 7, ALL, [0])
        await eng.pull_cache(dxl.CacheKey(P_ID, U, prefix_id=5), cache, batch_index=1)
        assert buf.matches(ALL, [1], 7, ALL, [2])
        await eng.pull_cache(dxl.CacheKeyByIdAndIndex(P_ID, 1, 3), cache, batch_index=0)
        assert buf.matches(ALL, [0], 7, ALL, [3])
        assert buf.untouched(ALL, [2])
        # registered caches keep their keys: pulling the same key again works
        await eng.pull_cache(dxl.CacheKey(P_ID, 10), cache, batch_index=2)
        assert buf.matches(ALL, [2], 7, ALL, [0])


async def test_pull_cache_size_and_layers(prefill):
    buf = KVBuffers(TENSORS, BATCHES, STRIDE, fill=False)
    eng, cache = await linked(prefill, buf)
    async with eng:
        await eng.pull_cache(dxl.CacheKey(P_ID, 10), cache, batch_index=1, size=1024)
        head = buf.blocks(0)[1, :128]  # 1024 bytes = 128 words copied, the rest untouched
        assert not buf.blocks(0)[1, 128:].any()
        ref = KVBuffers(TENSORS, BATCHES, STRIDE, seed=7)
        assert (head == ref.blocks(0)[0, :128]).all()
        await eng.pull_cache(
            dxl.CacheKey(P_ID, 10),
            cache,
            batch_index=2,
            src_layer_range=range(1, 2),
            dst_layer_range=range(0, 1),
        )
        assert buf.matches([0, 1], [2], 7, [2, 3], [0])
        assert buf.untouched([2, 3], [2])


PULL_CACHE_ERRORS = [
    ("blocks key", dict(cache_key=dxl.BlocksCacheKey(P_ID, 0)), TypeError, None),
    ("batch_index type", dict(batch_index="0"), TypeError, None),
    ("batch_index range", dict(batch_index=BATCHES), dxl.LLMException, S.LLM_PARAM_INVALID),
    ("size zero", dict(size=0), dxl.LLMException, S.LLM_PARAM_INVALID),
    ("size over stride", dict(size=STRIDE + 8), dxl.LLMException, S.LLM_PARAM_INVALID),
    (
        "both ids",
        dict(cache_key=dxl.CacheKey(P_ID, 10, 0, 5)),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
    ),
    ("no id", dict(cache_key=dxl.CacheKey(P_ID, U)), dxl.LLMException, S.LLM_PARAM_INVALID),
    (
        "unknown key",
        dict(cache_key=dxl.CacheKey(P_ID, 11)),
        dxl.LLMException,
        S.LLM_KV_CACHE_NOT_EXIST,
    ),
    (
        "unknown id",
        dict(cache_key=dxl.CacheKeyByIdAndIndex(P_ID, 9, 0)),
        dxl.LLMException,
        S.LLM_KV_CACHE_NOT_EXIST,
    ),
    (
        "batch missing",
        dict(cache_key=dxl.CacheKeyByIdAndIndex(P_ID, 1, BATCHES)),
        dxl.LLMException,
        S.LLM_KV_CACHE_NOT_EXIST,
    ),
    ("not linked", dict(cache_key=dxl.CacheKey(5, 10)), dxl.LLMException, S.LLM_NOT_YET_LINK),
    ("own cluster", dict(cache_key=dxl.CacheKey(D_ID, 10)), dxl.LLMException, S.LLM_PARAM_INVALID),
    ("tnpl", dict(kwargs=dict(tensor_num_per_layer=0)), dxl.LLMException, S.LLM_PARAM_INVALID),
]


@pytest.mark.parametrize(
    ("what", "override", "exc", "code"), PULL_CACHE_ERRORS, ids=[c[0] for c in PULL_CACHE_ERRORS]
)
async def test_pull_cache_errors(prefill, what, override, exc, code):
    buf = KVBuffers(TENSORS, BATCHES, STRIDE, fill=False)
    eng, cache = await linked(prefill, buf)
    async with eng:
        call: dict[str, Any] = dict(
            cache_key=dxl.CacheKey(P_ID, 10), batch_index=0, size=-1, kwargs={}
        )
        call.update(override)
        with pytest.raises(exc) as err:
            await eng.pull_cache(
                call["cache_key"], cache, call["batch_index"], call["size"], **call["kwargs"]
            )
        if code is not None:
            assert err.value.status_code == code
        assert buf.untouched(ALL, list(range(BATCHES)))


async def test_pull_cache_into_blocks_cache_refused(prefill):
    buf = KVBuffers(TENSORS, BATCHES, STRIDE, fill=False)
    eng, cache = await linked(prefill, buf, blocks=True)
    async with eng:
        with pytest.raises(dxl.LLMException, match="contiguous") as err:
            await eng.pull_cache(dxl.CacheKey(P_ID, 10), cache)
        assert err.value.status_code == S.LLM_PARAM_INVALID


async def test_pull_blocks_from_contiguous(prefill):
    """Chunk i (local block size) of the remote batch lands in local block dst_blocks[i]."""
    block = STRIDE // 4
    buf = KVBuffers(TENSORS, 16, block, fill=False)
    eng, cache = await linked(prefill, buf, blocks=True)
    async with eng:
        await eng.pull_blocks(dxl.CacheKey(P_ID, 10), cache, [], [9, 3, 4])
        ref = KVBuffers(TENSORS, BATCHES, STRIDE, seed=7)
        for t in ALL:
            got = buf.blocks(t)
            batch0 = ref.blocks(t)[0].reshape(4, block // 8)
            assert (got[9] == batch0[0]).all()
            assert (got[3] == batch0[1]).all()
            assert (got[4] == batch0[2]).all()
        assert buf.untouched(ALL, [0, 1, 2, 5, 8, 10])
        with pytest.raises(dxl.LLMException, match="src_blocks must be empty") as err:
            await eng.pull_blocks(dxl.CacheKey(P_ID, 10), cache, [0], [0])
        assert err.value.status_code == S.LLM_PARAM_INVALID
        with pytest.raises(dxl.LLMException, match="exceed") as err:
            await eng.pull_blocks(dxl.CacheKey(P_ID, 10), cache, [], list(range(5)))
        assert err.value.status_code == S.LLM_PARAM_INVALID


async def test_push_cache(make_peer):
    peer = make_peer(P_ID)
    peer.call(
        "register",
        name="kv",
        contiguous=True,
        num_tensors=TENSORS,
        num_blocks=BATCHES,
        block_bytes=STRIDE,
        seed=7,
        fill=False,
    )
    src = KVBuffers(TENSORS, BATCHES, STRIDE, seed=3)
    eng, cache = await linked(peer, src)
    async with eng:
        await eng.push_cache(dxl.CacheKeyByIdAndIndex(P_ID, 1, 2), cache, src_batch_index=1)
        args = dict(tensors=ALL, dst_blocks=[2], src_seed=3, src_tensors=ALL, src_blocks=[1])
        assert peer.call("matches", name="kv", args=args)
        assert peer.call("untouched", name="kv", tensors=ALL, blocks=[0, 1, 3])
        await eng.push_cache(
            dxl.CacheKeyByIdAndIndex(P_ID, 1, 0),
            cache,
            3,
            src_layer_range=range(0, 1),
            dst_layer_range=range(1, 2),
        )
        args = dict(tensors=[2, 3], dst_blocks=[0], src_seed=3, src_tensors=[0, 1], src_blocks=[3])
        assert peer.call("matches", name="kv", args=args)
        assert peer.call("untouched", name="kv", tensors=[0, 1], blocks=[0])
        for bad, exc in (
            (dict(size=16), dxl.LLMException),
            (dict(src_batch_index=-1), ValueError),
            (dict(dst_cache_key=dxl.CacheKey(P_ID, 1)), TypeError),
            (dict(dst_cache_key=None), TypeError),
        ):
            call = dict(dst_cache_key=dxl.CacheKeyByIdAndIndex(P_ID, 1, 0), src_cache=cache)
            call.update(bad)
            with pytest.raises(exc):
                await eng.push_cache(**call)
        assert peer.call("untouched", name="kv", tensors=ALL, blocks=[1, 3])


async def test_key_binding_rules():
    buf = KVBuffers(TENSORS, BATCHES, STRIDE)
    other = KVBuffers(TENSORS, BATCHES, STRIDE)
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT) as eng:
        with pytest.raises(dxl.LLMException, match="only 4 batches") as err:
            await eng.register_cache(
                buf.desc(), buf.addrs, [dxl.CacheKey(P_ID, i) for i in range(5)]
            )
        assert err.value.status_code == S.LLM_PARAM_INVALID
        with pytest.raises(dxl.LLMException, match="twice"):
            await eng.register_cache(
                buf.desc(), buf.addrs, [dxl.CacheKey(P_ID, 1), dxl.CacheKey(P_ID, 1)]
            )
        with pytest.raises(TypeError, match="cache_keys"):
            await eng.register_cache(buf.desc(), buf.addrs, [dxl.BlocksCacheKey(P_ID, 0)])  # type: ignore[list-item]
        assert eng.stats()["caches"] == 0
        await eng.register_cache(buf.desc(), buf.addrs, [dxl.CacheKey(P_ID, 1)])
        with pytest.raises(dxl.LLMException, match="already bound"):
            await eng.register_cache(other.desc(), other.addrs, [dxl.CacheKey(P_ID, 1)])
        # the same id as a prefix key lives in another namespace
        await eng.register_cache(other.desc(), other.addrs, [dxl.CacheKey(P_ID, U, 0, 1)])
        await eng.remove_cache_key(dxl.CacheKey(P_ID, 1))  # registered cache: no effect
        with pytest.raises(TypeError):
            await eng.remove_cache_key(dxl.BlocksCacheKey(P_ID, 0))  # type: ignore[arg-type]
        dxl.CacheManager.check_cache_key(dxl.CacheKey(P_ID, 1))
        with pytest.raises(dxl.LLMException):
            dxl.CacheManager.check_cache_key(dxl.CacheKey(P_ID, 1, 0, 2))


async def test_switch_role_moves_the_listener(make_peer):
    peer = make_peer(P_ID)
    peer.call(
        "register",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=8,
        block_bytes=1024,
        seed=1,
        model_id=0,
    )
    buf = KVBuffers(TENSORS, 8, 1024, fill=False)
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER) as eng:
        cache = await eng.register_blocks_cache(
            buf.desc(), buf.addrs, dxl.BlocksCacheKey(D_ID, 0), remote_accessible=True
        )
        assert (await eng.link_clusters([peer.cluster_info()]))[0] == S.LLM_SUCCESS
        with pytest.raises(dxl.LLMException) as err:
            await eng.switch_role(dxl.LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:0"})
        assert err.value.status_code == S.LLM_EXIST_LINK
        assert (await eng.unlink_clusters([peer.cluster_info()]))[0] == S.LLM_SUCCESS
        await eng.switch_role(dxl.LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:0"})
        assert eng.role == dxl.LLMRole.PROMPT and eng.listen_address is not None
        # the former prefill switches to decoder, links to us, and pushes with layer ranges
        assert await peer.acall("switch_role", role="DECODER") is None
        ret = await peer.acall("link", cluster_id=D_ID, address=list(eng.listen_address))
        assert ret == S.LLM_SUCCESS
        await peer.acall(
            "push",
            name="kv",
            cluster_id=D_ID,
            model_id=0,
            src_blocks=[0, 1],
            dst_blocks=[5, 6],
            kwargs=dict(src_layer_range=range(0, 1), dst_layer_range=range(1, 2)),
        )
        assert buf.matches([2, 3], [5, 6], 1, [0, 1], [0, 1])
        assert buf.untouched([0, 1], [5, 6])
        # force-unlink is local: both ends call it, as the reference's sample does
        await peer.acall("unlink", cluster_id=D_ID, address=list(eng.listen_address), force=True)
        _, rets = await eng.unlink_clusters([peer.cluster_info()], force=True)
        assert rets == [S.LLM_SUCCESS]
        await eng.switch_role(dxl.LLMRole.DECODER)
        listening: tuple[str, int] | None = eng.listen_address  # read again (mypy narrowed it)
        assert listening is None
        with pytest.raises(TypeError):
            await eng.switch_role("PROMPT")  # type: ignore[arg-type]
        del cache
