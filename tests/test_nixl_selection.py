"""The nixl transport's selection and gates, which need no NIXL installed (the default suite):
``auto`` never picks it, forcing it without RDMA hardware is refused with the reason unless
``dxl.NixlAllowEmulated``, ``Placement.DEVICE`` caches are accepted only by an engine whose
transport is nixl and are never copied locally (memcpy on a device pointer), and ``import dxl``
imports nothing of NIXL."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import dxl
from dxl.transport.nixl import hardware_rma, nixl_version
from dxl.transport.select import AUTO_ORDER

S = dxl.LLMStatusCode
NOT_MAPPED = 0x7F0000000000  # a device pointer: never mapped in this process


def fresh_log_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handshake's rate-limited log starts empty, so this test sees its own lines (earlier
    refusals in this process may have used up the window)."""
    from dxl.engine import handshake

    monkeypatch.setattr(handshake.limited, "_windows", {})


def info_of(eng: dxl.Engine) -> dxl.LLMClusterInfo:
    assert eng.listen_address is not None
    info = dxl.LLMClusterInfo()
    info.remote_cluster_id = eng.cluster_id
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info(*eng.listen_address)
    return info


def device_desc(blocks: int = 4) -> dxl.CacheDesc:
    return dxl.CacheDesc(2, [blocks, 1024], dxl.DataType.DT_FLOAT16, dxl.Placement.DEVICE)


def test_auto_never_tries_nixl():
    assert "nixl" not in AUTO_ORDER


async def test_forcing_nixl_without_rdma_is_refused_with_the_reason(caplog, monkeypatch):
    fresh_log_windows(monkeypatch)
    if hardware_rma():
        pytest.skip(f"this host has RDMA devices {hardware_rma()}: nothing is emulated")
    caplog.set_level(logging.ERROR, logger="dxl")
    nixl = {"dxl.Transport": "nixl", "llm.listenIpInfo": "127.0.0.1:0"}
    async with (
        dxl.Engine(1, dxl.LLMRole.PROMPT, nixl) as p,
        dxl.Engine(2, dxl.LLMRole.DECODER, nixl) as d,
    ):
        ret, rets = await d.link_clusters([info_of(p)], timeout=5000)
        assert (ret, rets) == (S.LLM_LINK_FAILED, [S.LLM_LINK_FAILED])
        assert "no RDMA device" in caplog.text and "dxl.NixlAllowEmulated" in caplog.text
        assert "any address of this process" in caplog.text
        assert d.stats()["links"] == {} and p.stats()["links"] == {}


async def test_device_caches_need_the_nixl_transport():
    async with dxl.Engine(1, dxl.LLMRole.PROMPT) as eng:
        with pytest.raises(dxl.LLMException) as err:
            await eng.register_blocks_cache(device_desc(), [NOT_MAPPED, NOT_MAPPED + (1 << 20)])
        assert err.value.status_code == S.LLM_FEATURE_NOT_ENABLED
        assert "nixl" in str(err.value)


async def test_device_caches_of_a_nixl_engine_are_never_copied_locally():
    """Registered (remotely accessible by default, as the reference does), but a local copy
    would dereference device pointers: refused, and the process is still here to say so."""
    async with dxl.Engine(1, dxl.LLMRole.PROMPT, {"dxl.Transport": "nixl"}) as eng:
        cache = await eng.register_blocks_cache(device_desc(), [NOT_MAPPED, NOT_MAPPED + (1 << 20)])
        assert cache.remote_accessible
        for call in (
            eng.copy_blocks(cache, {0: [1]}),
            eng.swap_blocks(cache, cache, {0: 1}),
            eng.copy_cache(cache, cache),
        ):
            with pytest.raises(dxl.LLMException) as err:
                await call
            assert err.value.status_code in (S.LLM_FEATURE_NOT_ENABLED, S.LLM_PARAM_INVALID)
        with pytest.raises(dxl.LLMException, match="HOST memory only"):
            await eng.copy_blocks(cache, {0: [1]})
        await eng.unregister_cache(cache.cache_id)


@pytest.mark.multiproc
def test_import_dxl_imports_no_nixl():
    code = "import sys, dxl, dxl.transport.select; print('nixl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", (nixl_version(), out.stdout)
