"""Push mode: complete() while a push of the same offer is still copying ends the offer only
after that copy returned (before, complete() sent its message at once: the decode saw DONE,
and could reuse its blocks, while the prefill was still writing them)."""

from __future__ import annotations

import asyncio

from waiting import async_wait_until, ops_inflight

import dxl
from dxl.handoff import Ended
from dxl.testing import KVBuffers

P_ID, D_ID = 31, 32
TENSORS, BLOCKS, BB = 8, 64, 64 << 10  # one push of every block: 32 MiB
SEED = 4
TRIES = 20


async def test_complete_waits_for_pushes_in_flight() -> None:
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
        src = list(range(BLOCKS))
        dst = src[::-1]
        rows = range(TENSORS)
        seen: list[tuple[Ended, bool]] = []

        async def watch() -> None:
            async for f in decode.handoff.finished():
                # the decode may reuse its blocks now: are all the bytes there already?
                seen.append((f.reason, dkv.matches(rows, dst, SEED, rows, src)))

        watcher = asyncio.create_task(watch())
        raced = 0
        for attempt in range(TRIES):  # until complete() was called mid-copy at least once
            for t in range(TENSORS):
                dkv.words[t].fill(0)
            ticket = await decode.handoff.offer_destination(f"r{attempt}", dcache, dst)
            push = asyncio.create_task(prefill.handoff.push(ticket, pcache, src))
            state = await async_wait_until(
                lambda push=push: "done" if push.done() else "copying" if ops_inflight() else None,
                30,
                "the push to copy or finish",
                first_s=0.0002,
                max_s=0.001,
            )
            await prefill.handoff.complete(ticket)  # mid-copy when state == "copying"
            await push
            await async_wait_until(lambda n=attempt: len(seen) > n, 30, "the offer's end")
            raced += state == "copying"
            if raced:
                break
        watcher.cancel()
        assert raced, f"complete() never ran while the push copied, in {TRIES} tries"
        assert seen == [(Ended.DONE, True)] * len(seen), seen
        assert decode.handoff.live() == 0 and prefill.handoff.stats()["claims"] == 0
