"""P/D demo: a prefill process and a decode process; decode links and pulls KV blocks.

Both processes own a realistic paged KV layout in framework-style numpy memory (one allocation
per tensor, K and V of every layer). The prefill side registers it with a BlocksCacheKey and
listens; the decode side registers its own cache, links, and pulls the blocks of a batch of
requests with random block tables into random free blocks, then verifies every byte and prints
a summary. Exit status 0 means every byte was right.

    python examples/pd_link_and_pull.py                  # 32 layers x K,V x 512 blocks of 32 KiB
    python examples/pd_link_and_pull.py --layers 8 --blocks 128 --requests 32
    python examples/pd_link_and_pull.py --transport tcp        # the network path
    python examples/pd_link_and_pull.py --share     # prefill memory moved onto memfds (cma+shm)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time

import numpy as np

PREFILL_ID, DECODE_ID = 1, 2
PREFILL_SEED = 11


def block_bytes(args: argparse.Namespace) -> int:
    return args.block_tokens * args.heads * args.head_dim * 2  # fp16


async def prefill_main(args: argparse.Namespace, conn: mp.connection.Connection) -> None:
    import dxl
    from dxl.testing import KVBuffers

    kv = KVBuffers(2 * args.layers, args.blocks, block_bytes(args), seed=PREFILL_SEED)
    cfg = dxl.LLMConfig()
    cfg.listen_ip_info = "127.0.0.1:0"
    cfg.transport = args.transport
    cfg.share_registered = args.share  # same-host decode then copies it with memcpy
    async with dxl.Engine(PREFILL_ID, dxl.LLMRole.PROMPT, cfg) as eng:
        await eng.register_blocks_cache(
            kv.desc(), kv.addrs, dxl.BlocksCacheKey(PREFILL_ID, 0), remote_accessible=True
        )
        conn.send(eng.listen_address)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # decode is done


async def decode_main(args: argparse.Namespace, address: tuple[str, int]) -> dict:
    import dxl
    from dxl.testing import KVBuffers

    layers, tensors = args.layers, 2 * args.layers
    kv = KVBuffers(tensors, args.blocks, block_bytes(args), fill=False)
    info = dxl.LLMClusterInfo()
    info.remote_cluster_id = PREFILL_ID
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info(*address)
    rng = np.random.default_rng(args.seed)
    cfg = dxl.LLMConfig()
    cfg.transport = args.transport
    async with dxl.Engine(DECODE_ID, dxl.LLMRole.DECODER, cfg) as eng:
        cache = await eng.register_blocks_cache(kv.desc(), kv.addrs)
        ret, _ = await eng.link_clusters([info], timeout=5000)
        if ret != dxl.LLMStatusCode.LLM_SUCCESS:
            raise SystemExit(f"link failed: {ret}")
        # each request: a random prefill block table, landing in random free decode blocks
        sizes = rng.integers(args.min_blocks, args.max_blocks + 1, size=args.requests)
        tables = [rng.choice(args.blocks, size=int(k), replace=False) for k in sizes]
        free = rng.permutation(args.blocks)
        sem = asyncio.Semaphore(args.concurrency)
        latencies: list[float] = []
        verified = True

        async def one(table: np.ndarray, dst: np.ndarray) -> None:
            nonlocal verified
            async with sem:
                t0 = time.perf_counter()
                await eng.pull_blocks(
                    dxl.BlocksCacheKey(PREFILL_ID, 0), cache, table.tolist(), dst.tolist()
                )
                latencies.append(time.perf_counter() - t0)
            everything = range(tensors)
            verified &= kv.matches(everything, dst, PREFILL_SEED, everything, table)

        t_start = time.perf_counter()
        pending = []
        cursor = 0
        for table in tables:
            if cursor + table.size > args.blocks:  # decode cache full: finish, reuse blocks
                await asyncio.gather(*pending)
                pending, cursor = [], 0
            pending.append(asyncio.ensure_future(one(table, free[cursor : cursor + table.size])))
            cursor += table.size
        await asyncio.gather(*pending)
        wall = time.perf_counter() - t_start
        stats = eng.stats()
        await eng.unlink_clusters([info])
    total_blocks = int(sizes.sum())
    lat = np.array(latencies) * 1e3
    return {
        "layers": layers,
        "tensors": tensors,
        "block_bytes": block_bytes(args),
        "requests": args.requests,
        "blocks": total_blocks,
        "bytes": stats["pull"]["bytes"],
        "gbps": stats["pull"]["bytes"] / wall / 1e9,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "transport": stats["links"][PREFILL_ID]["transport"],
        "verified": verified,
    }


def run_prefill(args: argparse.Namespace, conn: mp.connection.Connection) -> None:
    asyncio.run(prefill_main(args, conn))


def run_decode(args: argparse.Namespace, address: tuple[str, int], out: mp.Queue) -> None:
    out.put(asyncio.run(decode_main(args, address)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--blocks", type=int, default=512, help="blocks per tensor on each side")
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--min-blocks", type=int, default=4, help="smallest block table")
    p.add_argument("--max-blocks", type=int, default=64, help="largest block table")
    p.add_argument("--concurrency", type=int, default=4, help="pulls in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--transport",
        choices=("auto", "cma", "tcp"),
        default="auto",
        help="auto: cma on one host; tcp: the network path (loopback here)",
    )
    p.add_argument(
        "--share",
        action="store_true",
        help="prefill registers with dxl.ShareRegistered (docs/api.md)",
    )
    args = p.parse_args(argv)
    if not 1 <= args.min_blocks <= args.max_blocks <= args.blocks:
        p.error("need 1 <= --min-blocks <= --max-blocks <= --blocks")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    prefill = ctx.Process(target=run_prefill, args=(args, child), name="prefill")
    prefill.start()
    try:
        if not parent.poll(60):
            raise SystemExit("prefill did not start")
        address = parent.recv()
        results: mp.Queue = ctx.Queue()
        decode = ctx.Process(target=run_decode, args=(args, address, results), name="decode")
        decode.start()
        summary = results.get(timeout=600)
        decode.join(30)
        parent.send("done")
        prefill.join(30)
    finally:
        for proc in mp.active_children():
            proc.kill()
    kib = summary["block_bytes"] // 1024
    print(
        f"dxl P/D demo ({summary['transport']}): {summary['layers']} layers x K,V, "
        f"{kib} KiB blocks\n"
        f"  requests {summary['requests']}, blocks {summary['blocks']}, "
        f"bytes {summary['bytes'] / 2**20:.1f} MiB\n"
        f"  throughput {summary['gbps']:.2f} GB/s, latency p50 {summary['p50_ms']:.2f} ms, "
        f"p99 {summary['p99_ms']:.2f} ms\n"
        f"  verified: {'every byte matches' if summary['verified'] else 'MISMATCH'}"
    )
    return 0 if summary["verified"] and decode.exitcode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
