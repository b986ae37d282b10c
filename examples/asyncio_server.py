"""The decode side embedded in an asyncio request loop.

A toy decode server: requests arrive on an asyncio queue (as from a router) naming the prefill
block table of a prompt; the server takes free decode blocks from its allocator, awaits
``Engine.pull_blocks`` for them (the loop keeps serving other requests meanwhile), checks the
KV, "decodes" for a few milliseconds and frees the blocks. A prefill process (from
``pd_link_and_pull.py``) provides the KV. Prints one line per request and a summary.

    python examples/asyncio_server.py --requests 16
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time

import numpy as np
from pd_link_and_pull import PREFILL_ID, PREFILL_SEED, block_bytes, run_prefill

import dxl
from dxl.testing import KVBuffers


class BlockAllocator:
    """Free decode blocks; waiting for blocks is an await, never a busy loop."""

    def __init__(self, num_blocks: int) -> None:
        self._free = list(range(num_blocks))
        self._freed = asyncio.Condition()

    async def take(self, n: int) -> list[int]:
        async with self._freed:
            await self._freed.wait_for(lambda: len(self._free) >= n)
            taken, self._free = self._free[:n], self._free[n:]
            return taken

    async def give_back(self, blocks: list[int]) -> None:
        async with self._freed:
            self._free.extend(blocks)
            self._freed.notify_all()


async def serve(args: argparse.Namespace, prefill_address: tuple[str, int]) -> int:
    tensors = 2 * args.layers
    kv = KVBuffers(tensors, args.blocks, block_bytes(args), fill=False)
    allocator = BlockAllocator(args.blocks)
    queue: asyncio.Queue[tuple[int, list[int]] | None] = asyncio.Queue()
    failures = 0

    cfg = dxl.LLMConfig()
    cfg.transport = args.transport
    async with dxl.Engine(2, dxl.LLMRole.DECODER, cfg) as eng:
        cache = await eng.register_blocks_cache(kv.desc(), kv.addrs)
        info = dxl.LLMClusterInfo()
        info.remote_cluster_id = PREFILL_ID
        info.append_local_ip_info("127.0.0.1", 0)
        info.append_remote_ip_info(*prefill_address)
        ret, _ = await eng.link_clusters([info])
        if ret != dxl.LLMStatusCode.LLM_SUCCESS:
            print(f"link failed: {ret}")
            return 1

        async def handle(req_id: int, prompt_blocks: list[int]) -> None:
            nonlocal failures
            blocks = await allocator.take(len(prompt_blocks))
            t0 = time.perf_counter()
            try:
                await eng.pull_blocks(
                    dxl.BlocksCacheKey(PREFILL_ID, 0), cache, prompt_blocks, blocks
                )
            except dxl.LLMException as exc:  # a real server would re-route the request
                failures += 1
                print(f"request {req_id}: pull failed: {exc}")
                await allocator.give_back(blocks)
                return
            ms = (time.perf_counter() - t0) * 1e3
            ok = kv.matches(range(tensors), blocks, PREFILL_SEED, range(tensors), prompt_blocks)
            failures += not ok
            print(
                f"request {req_id}: {len(blocks)} blocks pulled in {ms:.2f} ms, "
                f"{'verified' if ok else 'MISMATCH'}"
            )
            await asyncio.sleep(args.decode_ms / 1000)  # the model's decode steps
            await allocator.give_back(blocks)

        async def router() -> None:
            rng = np.random.default_rng(1)
            for req_id in range(args.requests):
                n = int(rng.integers(1, args.max_blocks + 1))
                await queue.put((req_id, rng.choice(args.blocks, n, replace=False).tolist()))
                await asyncio.sleep(args.arrival_ms / 1000)
            await queue.put(None)

        router_task = asyncio.create_task(router())
        in_flight: set[asyncio.Task[None]] = set()
        while (item := await queue.get()) is not None:
            task = asyncio.create_task(handle(*item))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await router_task
        await asyncio.gather(*in_flight)
        pull = eng.stats()["pull"]
        print(
            f"served {args.requests} requests, {pull['bytes'] / 2**20:.1f} MiB pulled, "
            f"p50 {pull['p50_us'] / 1e3:.2f} ms, p99 {pull['p99_us'] / 1e3:.2f} ms, "
            f"failures {failures}"
        )
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-blocks", type=int, default=32)
    p.add_argument("--arrival-ms", type=float, default=2.0)
    p.add_argument("--decode-ms", type=float, default=5.0)
    p.add_argument("--transport", choices=("auto", "cma", "tcp"), default="auto")
    p.add_argument(
        "--share",
        action="store_true",
        help="prefill registers with dxl.ShareRegistered (docs/api.md)",
    )
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    prefill = ctx.Process(target=run_prefill, args=(args, child), name="prefill")
    prefill.start()
    try:
        if not parent.poll(60):
            raise SystemExit("prefill did not start")
        rc = asyncio.run(serve(args, parent.recv()))
        parent.send("done")
        prefill.join(30)
    finally:
        if prefill.is_alive():
            prefill.kill()
    return rc


if __name__ == "__main__":
    sys.exit(main())
