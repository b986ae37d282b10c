"""The nixl transport (``dxl.Transport=nixl``, the extra ``dxl[nixl]``): two engines of this
process over NIXL agents on host memory (UCX emulates RMA here, so the tests allow it with
``dxl.NixlAllowEmulated``). ``make test-nixl`` runs them in ``.venv-nixl``."""

from __future__ import annotations

import numpy as np
import pytest

import dxl
from dxl.testing import KVBuffers
from dxl.transport.nixl import nixl_version

pytestmark = [
    pytest.mark.nixl,
    pytest.mark.skipif(nixl_version() is None, reason="nixl is not installed (make test-nixl)"),
]

S = dxl.LLMStatusCode
LAYERS = 4
TENSORS = 2 * LAYERS
BLOCKS = 32
BB = 4096
P_ID, D_ID = 1, 2
ALL = list(range(TENSORS))
NIXL = {"dxl.Transport": "nixl", "dxl.NixlAllowEmulated": "1", "llm.SyncKvCacheWaitTime": "3000"}


def info_of(eng: dxl.Engine) -> dxl.LLMClusterInfo:
    assert eng.listen_address is not None
    info = dxl.LLMClusterInfo()
    info.remote_cluster_id = eng.cluster_id
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info(*eng.listen_address)
    return info


async def pair(options: dict[str, str] | None = None, *, link: bool = True):
    """A prefill engine (listening, a filled remotely accessible cache) and a decode engine
    (an empty one), both over nixl, linked."""
    opts = {**NIXL, **(options or {})}
    p = dxl.Engine(P_ID, dxl.LLMRole.PROMPT, {**opts, "llm.listenIpInfo": "127.0.0.1:0"})
    d = dxl.Engine(D_ID, dxl.LLMRole.DECODER, opts)
    await p.start()
    await d.start()
    src = KVBuffers(TENSORS, BLOCKS, BB, seed=7)
    dst = KVBuffers(TENSORS, BLOCKS, BB, seed=99)
    pc = await p.register_blocks_cache(
        src.desc(), src.addrs, dxl.BlocksCacheKey(P_ID, 0), remote_accessible=True
    )
    dc = await d.register_blocks_cache(
        dst.desc(), dst.addrs, dxl.BlocksCacheKey(D_ID, 0), remote_accessible=True
    )
    if link:
        ret, rets = await d.link_clusters([info_of(p)], timeout=10_000)
        assert ret == S.LLM_SUCCESS, rets
        assert d.stats()["links"][P_ID]["transport"] == "nixl"
    return p, d, pc, dc, src, dst


async def test_pull_and_push_blocks_byte_exact():
    p, d, _, dc, src, dst = await pair()
    async with p, d:
        s, t = [5, 6, 7, 30, 2], [0, 1, 2, 9, 31]
        await d.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), dc, s, t)
        assert dst.matches(ALL, t, 7, ALL, s)
        assert dst.untouched(ALL, sorted(set(range(BLOCKS)) - set(t)))
        await d.push_blocks(dxl.BlocksCacheKey(P_ID, 0), dc, [0, 1], [20, 21])
        assert src.matches(ALL, [20, 21], 99, ALL, [0, 1]) or np.array_equal(
            src.blocks(0)[20], dst.blocks(0)[0]
        )
        assert d.stats()["pull"]["bytes"] == TENSORS * len(s) * BB
