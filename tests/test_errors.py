"""Every documented error of registration, pull_blocks and push_blocks, and that a failed call
leaves memory, registrations and links exactly as they were."""

from __future__ import annotations

import pytest

import dxl
from dxl.testing import KVBuffers

pytestmark = [pytest.mark.multiproc, pytest.mark.cma]

S = dxl.LLMStatusCode
TENSORS, BLOCKS, BB = 4, 8, 1024
P_ID, D_ID = 1, 2


@pytest.fixture
def prefill(make_peer):
    peer = make_peer(P_ID)
    peer.call(
        "register",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BB,
        seed=7,
        model_id=0,
    )
    peer.call(
        "register",
        name="private",
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BB,
        seed=8,
        model_id=1,
        remote_accessible=False,
    )
    return peer


@pytest.fixture
async def decoder(prefill):
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER) as eng:
        ret, _ = await eng.link_clusters([prefill.cluster_info()])
        assert ret == S.LLM_SUCCESS
        buf = KVBuffers(TENSORS, BLOCKS, BB, seed=3)
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
        yield eng, cache, buf


def snapshot(eng):
    st = eng.stats()
    return st["caches"], st["registered_addrs"], sorted(st["links"])


PULL_CASES = [
    # (description, call kwargs, exception type, status code or None, message fragment)
    ("key wrong type", dict(src_cache_key="k"), TypeError, None, "src_cache_key"),
    ("key None", dict(src_cache_key=None), TypeError, None, "src_cache_key"),
    ("cache wrong type", dict(dst_cache=3), TypeError, None, "dst_cache"),
    ("cache None", dict(dst_cache=None), AttributeError, None, "dst_cache"),
    ("src_blocks not a list", dict(src_blocks=5), TypeError, None, "src_blocks"),
    ("dst_blocks element type", dict(dst_blocks=[0, "1"]), TypeError, None, "dst_blocks"),
    ("dst_blocks float", dict(dst_blocks=[0.5]), TypeError, None, "dst_blocks"),
    ("dst_blocks empty", dict(dst_blocks=[]), dxl.LLMException, S.LLM_PARAM_INVALID, "empty"),
    ("src_blocks empty", dict(src_blocks=[]), dxl.LLMException, S.LLM_PARAM_INVALID, "empty"),
    (
        "length mismatch",
        dict(src_blocks=[0, 1]),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "same length",
    ),
    (
        "remote block too big",
        dict(src_blocks=[BLOCKS]),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "src_blocks",
    ),
    (
        "remote block negative",
        dict(src_blocks=[-1]),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "src_blocks",
    ),
    (
        "local block too big",
        dict(dst_blocks=[BLOCKS + 5]),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "dst_blocks",
    ),
    (
        "unlinked cluster",
        dict(src_cache_key=dxl.BlocksCacheKey(99, 0)),
        dxl.LLMException,
        S.LLM_NOT_YET_LINK,
        "99",
    ),
    (
        "own cluster",
        dict(src_cache_key=dxl.BlocksCacheKey(D_ID, 0)),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "own cluster",
    ),
    (
        "unknown key",
        dict(src_cache_key=dxl.BlocksCacheKey(P_ID, 5)),
        dxl.LLMException,
        S.LLM_KV_CACHE_NOT_EXIST,
        "model_id=5",
    ),
    (
        "not remotely accessible",
        dict(src_cache_key=dxl.BlocksCacheKey(P_ID, 1)),
        dxl.LLMException,
        S.LLM_KV_CACHE_NOT_EXIST,
        "remote_accessible=True",
    ),
    (
        "tensor_num_per_layer 0",
        dict(kwargs=dict(tensor_num_per_layer=0)),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "tensor_num_per_layer",
    ),
    (
        "tensor_num_per_layer type",
        dict(kwargs=dict(tensor_num_per_layer="2")),
        TypeError,
        None,
        "tensor_num_per_layer",
    ),
    (
        "layer range step",
        dict(kwargs=dict(src_layer_range=range(0, 2, 2))),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "src_layer_range",
    ),
    (
        "layer range type",
        dict(kwargs=dict(dst_layer_range=[0, 1])),
        TypeError,
        None,
        "dst_layer_range",
    ),
    (
        "layer range beyond cache",
        dict(kwargs=dict(src_layer_range=range(0, 3), dst_layer_range=range(0, 3))),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "exceeds",
    ),
    (
        "layer counts differ",
        dict(kwargs=dict(src_layer_range=range(0, 1), dst_layer_range=range(0, 2))),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "same number of tensors",
    ),
    ("unknown kwarg", dict(kwargs=dict(bogus=1)), TypeError, None, "bogus"),
]


@pytest.mark.parametrize(
    ("what", "override", "exc", "code", "fragment"), PULL_CASES, ids=[c[0] for c in PULL_CASES]
)
async def test_pull_blocks_errors(decoder, what, override, exc, code, fragment):
    eng, cache, buf = decoder
    call = dict(
        src_cache_key=dxl.BlocksCacheKey(P_ID, 0),
        dst_cache=cache,
        src_blocks=[1],
        dst_blocks=[2],
        kwargs={},
    )
    call.update(override)
    before = snapshot(eng)
    with pytest.raises(exc, match=fragment) as err:
        await eng.pull_blocks(
            call["src_cache_key"],
            call["dst_cache"],
            call["src_blocks"],
            call["dst_blocks"],
            **call["kwargs"],
        )
    if code is not None:
        assert err.value.status_code == code
    assert snapshot(eng) == before
    assert buf.untouched(list(range(TENSORS)), list(range(BLOCKS)))


async def test_pull_into_unregistered_cache(decoder):
    eng, cache, buf = decoder
    await eng.unregister_cache(cache.cache_id)
    with pytest.raises(dxl.LLMException) as err:
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [1], [1])
    assert err.value.status_code == S.LLM_KV_CACHE_NOT_EXIST
    assert buf.untouched(list(range(TENSORS)), list(range(BLOCKS)))


async def test_pull_into_contiguous_cache_refused(decoder):
    eng, _cache, _ = decoder
    buf = KVBuffers(TENSORS, BLOCKS, BB, seed=4)
    contiguous = await eng.register_cache(buf.desc(), buf.addrs)
    with pytest.raises(dxl.LLMException, match="blocks cache") as err:
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), contiguous, [1], [1])
    assert err.value.status_code == S.LLM_PARAM_INVALID
    assert buf.untouched(list(range(TENSORS)), list(range(BLOCKS)))


PUSH_CASES = [
    ("key wrong type", dict(dst_cache_key=dxl.CacheKey(P_ID, 0)), TypeError, None, "dst_cache_key"),
    ("cache None", dict(src_cache=None), AttributeError, None, "src_cache"),
    ("dst_blocks empty", dict(dst_blocks=[]), dxl.LLMException, S.LLM_PARAM_INVALID, "empty"),
    (
        "length mismatch",
        dict(src_blocks=[1, 2]),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "same length",
    ),
    (
        "remote block out of range",
        dict(dst_blocks=[BLOCKS]),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "dst_blocks",
    ),
    (
        "local block out of range",
        dict(src_blocks=[-3]),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "src_blocks",
    ),
    (
        "unlinked",
        dict(dst_cache_key=dxl.BlocksCacheKey(42, 0)),
        dxl.LLMException,
        S.LLM_NOT_YET_LINK,
        "42",
    ),
    (
        "not remotely accessible",
        dict(dst_cache_key=dxl.BlocksCacheKey(P_ID, 1)),
        dxl.LLMException,
        S.LLM_KV_CACHE_NOT_EXIST,
        "remote_accessible=True",
    ),
    (
        "range step",
        dict(dst_layer_range=range(0, 4, 2)),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "dst_layer_range",
    ),
]


@pytest.mark.parametrize(
    ("what", "override", "exc", "code", "fragment"), PUSH_CASES, ids=[c[0] for c in PUSH_CASES]
)
async def test_push_blocks_errors(decoder, prefill, what, override, exc, code, fragment):
    eng, cache, _ = decoder
    call = dict(
        dst_cache_key=dxl.BlocksCacheKey(P_ID, 0),
        src_cache=cache,
        src_blocks=[1],
        dst_blocks=[2],
        src_layer_range=None,
        dst_layer_range=None,
    )
    call.update(override)
    before = snapshot(eng)
    with pytest.raises(exc, match=fragment) as err:
        await eng.push_blocks(**call)
    if code is not None:
        assert err.value.status_code == code
    assert snapshot(eng) == before
    blocks = list(range(BLOCKS))
    assert prefill.call("untouched", name="kv", tensors=list(range(TENSORS)), blocks=blocks)


REGISTER_CASES = [
    ("desc None", dict(cache_desc=None), AttributeError, None, "cache_desc"),
    ("desc wrong type", dict(cache_desc="desc"), TypeError, None, "cache_desc"),
    ("addrs tuple", dict(addrs="tuple"), TypeError, None, "addrs"),
    ("addrs element", dict(addrs=[1.5]), TypeError, None, "addrs"),
    ("addrs None", dict(addrs=None), TypeError, None, "addrs"),
    ("addrs empty", dict(addrs=[]), dxl.LLMException, S.LLM_PARAM_INVALID, "addrs"),
    ("addrs count", dict(addrs="short"), dxl.LLMException, S.LLM_PARAM_INVALID, "num_tensors"),
    ("addr zero", dict(addrs="zero"), dxl.LLMException, S.LLM_PARAM_INVALID, "addrs"),
    ("addr unmapped", dict(addrs="unmapped"), dxl.LLMException, S.LLM_PARAM_INVALID, "mapped"),
    ("key wrong type", dict(key=dxl.CacheKey(1, 2)), TypeError, None, "blocks_cache_key"),
    ("remote_accessible type", dict(remote_accessible=1), TypeError, None, "remote_accessible"),
    (
        "model_id taken",
        dict(key=dxl.BlocksCacheKey(D_ID, 0)),
        dxl.LLMException,
        S.LLM_PARAM_INVALID,
        "model_id=0",
    ),
]


@pytest.mark.parametrize(
    ("what", "override", "exc", "code", "fragment"),
    REGISTER_CASES,
    ids=[c[0] for c in REGISTER_CASES],
)
async def test_register_errors(what, override, exc, code, fragment):
    buf = KVBuffers(TENSORS, BLOCKS, BB, seed=1)
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER) as eng:
        await eng.register_blocks_cache(buf.desc(), buf.addrs, dxl.BlocksCacheKey(D_ID, 0))
        other = KVBuffers(TENSORS, BLOCKS, BB, seed=2)
        addrs = {
            "tuple": tuple(other.addrs),
            "short": other.addrs[:-1],
            "zero": [0, *other.addrs[1:]],
            "unmapped": [8 << 40, *other.addrs[1:]],  # no mapping in the low canonical half
        }
        call = dict(cache_desc=other.desc(), addrs=other.addrs, key=None, remote_accessible=None)
        call.update(override)
        if isinstance(call["addrs"], str):
            call["addrs"] = addrs[call["addrs"]]
        before = snapshot(eng)
        with pytest.raises(exc, match=fragment) as err:
            await eng.register_blocks_cache(  # deliberately bad arguments
                call["cache_desc"],  # type: ignore[arg-type]
                call["addrs"],  # type: ignore[arg-type]
                call["key"],  # type: ignore[arg-type]
                call["remote_accessible"],  # type: ignore[arg-type]
            )
        if code is not None:
            assert err.value.status_code == code
        assert snapshot(eng) == before


async def test_241st_address_is_refused():
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER) as eng:
        first = KVBuffers(160, 2, 64)
        await eng.register_blocks_cache(first.desc(), first.addrs)
        second = KVBuffers(80, 2, 64)
        await eng.register_blocks_cache(second.desc(), second.addrs)  # exactly 240
        third = KVBuffers(1, 2, 64)
        with pytest.raises(dxl.LLMException, match=r"241.*240") as err:
            await eng.register_blocks_cache(third.desc(), third.addrs)
        assert err.value.status_code == S.LLM_PARAM_INVALID
        assert eng.stats()["registered_addrs"] == 240
    cfg = dxl.LLMConfig()
    cfg.max_registered_addrs = 241
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER, cfg) as eng:
        for buf in (first, second, third):
            await eng.register_blocks_cache(buf.desc(), buf.addrs)
        assert eng.stats()["registered_addrs"] == 241


async def test_registration_ids_start_at_one_and_defaults():
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER) as eng:
        a, b = KVBuffers(2, 2, 64), KVBuffers(2, 2, 64)
        ca = await eng.register_blocks_cache(a.desc(), a.addrs)
        cb = await eng.register_cache(b.desc(), b.addrs, remote_accessible=True)
        assert (ca.cache_id, cb.cache_id) == (1, 2)
        assert ca.is_blocks_cache and not cb.is_blocks_cache
        assert ca.remote_accessible is False  # HOST default, as the seed documents
        assert cb.remote_accessible is True
        assert ca.tensor_addrs == a.addrs
        await eng.unregister_cache(12345)  # unknown id: no-op
        assert eng.stats()["caches"] == 2


async def test_link_argument_errors():
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER) as eng:
        info = dxl.LLMClusterInfo()
        info.remote_cluster_id = 1
        info.append_remote_ip_info("127.0.0.1", 9)
        with pytest.raises(dxl.LLMException, match="local_ip_info_list") as err:
            await eng.link_clusters([info])
        assert err.value.status_code == S.LLM_PARAM_INVALID
        info.append_local_ip_info("127.0.0.1", 0)
        with pytest.raises(TypeError, match="clusters"):
            await eng.link_clusters(info)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="timeout"):
            await eng.link_clusters([info], timeout="1")  # type: ignore[arg-type]
        with pytest.raises(dxl.LLMException, match="timeout") as err:
            await eng.link_clusters([info], timeout=0)
        assert err.value.status_code == S.LLM_PARAM_INVALID
        with pytest.raises(TypeError, match="remote_cluster_id"):
            await eng.link_clusters([dxl.LLMClusterInfo()])
        with pytest.raises(TypeError, match="force"):
            await eng.unlink_clusters([info], force=1)  # type: ignore[arg-type]
        assert eng.stats()["links"] == {}
