"""Concurrent first fetches from an engine the fetcher has no link to yet share one link
attempt (found by examples/pd_handoff.py: a second link_clusters to a peer being linked fails
with LLM_PROCESSING_LINK, and every fetch but the first failed with "cannot link")."""

from __future__ import annotations

import asyncio

import dxl
from dxl.handoff import Ended
from dxl.testing import KVBuffers

P_ID, D_ID = 21, 22
TENSORS, BLOCKS, BB, N = 4, 32, 4096, 8
SEED = 3


async def test_concurrent_first_fetches_share_one_link() -> None:
    pkv = KVBuffers(TENSORS, BLOCKS, BB, seed=SEED)
    dkv = KVBuffers(TENSORS, BLOCKS, BB, fill=False)
    cfgs = []
    for _ in range(2):
        cfg = dxl.LLMConfig()
        cfg.listen_ip_info = "127.0.0.1:0"
        cfgs.append(cfg)
    async with (
        dxl.Engine(P_ID, dxl.LLMRole.PROMPT, cfgs[0]) as prefill,
        dxl.Engine(D_ID, dxl.LLMRole.DECODER, cfgs[1]) as decode,
    ):
        pcache = await prefill.register_blocks_cache(
            pkv.desc(), pkv.addrs, dxl.BlocksCacheKey(P_ID, 0), remote_accessible=True
        )
        dcache = await decode.register_blocks_cache(dkv.desc(), dkv.addrs, remote_accessible=True)
        tickets = [
            (await prefill.handoff.offer(f"r{i}", pcache, [2 * i, 2 * i + 1])).to_json()
            for i in range(N)
        ]
        assert decode.stats()["links"] == {}  # no link yet: every fetch below wants one
        await asyncio.gather(
            *(
                decode.handoff.fetch(t, dcache, [BLOCKS - 1 - 2 * i, BLOCKS - 2 - 2 * i])
                for i, t in enumerate(tickets)
            )
        )
        rows = range(TENSORS)
        for i in range(N):
            dst = [BLOCKS - 1 - 2 * i, BLOCKS - 2 - 2 * i]
            assert dkv.matches(rows, dst, SEED, rows, [2 * i, 2 * i + 1]), i
        assert list(decode.stats()["links"]) == [P_ID]
        ends = {f.request_id: f.reason for f in prefill.handoff.poll_finished()}
        assert ends == {f"r{i}": Ended.DONE for i in range(N)}
