"""CMA pull GB/s through dxl.Engine.pull_blocks, against single-thread memcpy of the same pieces.

Workload (the anchors' shape): the target process owns L layers x (K, V) tensors, each its own
allocation of N blocks of B bytes, at least 512 MiB in all; each request pulls k random,
distinct block ids of every tensor (k * 2L pieces) into the same ids of the initiator's cache.
The baseline copies the same piece list with one thread inside the initiator, between two
local buffers of the same layout, in the same run. Every pull is verified byte for byte.

    python benchmarks/cma_pull_vs_memcpy.py                 # 64 KiB blocks, 3 passes
    python benchmarks/cma_pull_vs_memcpy.py --block-bytes 4096 65536 262144 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time

import numpy as np

TARGET_ID, INITIATOR_ID, SEED = 1, 2, 21


def shape_for(block_bytes: int, layers: int) -> tuple[int, int]:
    """(blocks per tensor, blocks per request) as the anchors: >= 512 MiB, <= 256 MiB/request."""
    tensors = 2 * layers
    blocks = max(64, (512 << 20) // (tensors * block_bytes))
    k = 64 if block_bytes <= 64 << 10 else max(1, (256 << 20) // (tensors * block_bytes))
    return blocks, min(k, blocks)


async def target_main(layers: int, block_bytes: int, conn) -> None:
    import dxl
    from dxl.testing import KVBuffers

    blocks, _ = shape_for(block_bytes, layers)
    kv = KVBuffers(2 * layers, blocks, block_bytes, seed=SEED)
    cfg = dxl.LLMConfig()
    cfg.listen_ip_info = "127.0.0.1:0"
    async with dxl.Engine(TARGET_ID, dxl.LLMRole.PROMPT, cfg) as eng:
        await eng.register_blocks_cache(
            kv.desc(), kv.addrs, dxl.BlocksCacheKey(TARGET_ID, 0), remote_accessible=True
        )
        conn.send(eng.listen_address)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)


def run_target(layers: int, block_bytes: int, conn) -> None:
    asyncio.run(target_main(layers, block_bytes, conn))


def memcpy_pass(dst, src, tables: list[np.ndarray], block_bytes: int) -> float:
    """Seconds for one thread to memcpy every request's pieces between two local caches."""
    from dxl import _ffi
    from dxl.memory.plan import block_pieces

    dst_bases = np.asarray(dst.addrs, dtype=np.uint64)
    src_bases = np.asarray(src.addrs, dtype=np.uint64)
    plans = [block_pieces(dst_bases, src_bases, t, t, block_bytes) for t in tables]
    t0 = time.perf_counter()
    for p in plans:
        _ffi.check(
            _ffi.lib.dxl_copy_pieces(
                _ffi.as_u64_ptr(p.dst),
                _ffi.as_u64_ptr(p.src),
                _ffi.as_u64_ptr(p.length),
                p.count,
                1,
            ),
            "memcpy",
        )
    return time.perf_counter() - t0


async def measure(
    layers: int,
    block_bytes: int,
    address: tuple[str, int],
    passes: int,
    requests: int,
    threads: int,
) -> dict:
    import dxl
    from dxl.testing import KVBuffers

    tensors = 2 * layers
    blocks, k = shape_for(block_bytes, layers)
    dst = KVBuffers(tensors, blocks, block_bytes, fill=False)
    local_src = KVBuffers(tensors, blocks, block_bytes, seed=SEED)
    info = dxl.LLMClusterInfo()
    info.remote_cluster_id = TARGET_ID
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info(*address)
    rng = np.random.default_rng(0)
    dxl_gbps, base_gbps = [], []
    request_bytes = k * tensors * block_bytes
    cfg = dxl.LLMConfig()
    cfg.transfer_threads = threads
    async with dxl.Engine(INITIATOR_ID, dxl.LLMRole.DECODER, cfg) as eng:
        cache = await eng.register_blocks_cache(dst.desc(), dst.addrs)
        ret, _ = await eng.link_clusters([info], timeout=5000)
        assert ret == dxl.LLMStatusCode.LLM_SUCCESS, ret
        key = dxl.BlocksCacheKey(TARGET_ID, 0)
        verified = True
        for _ in range(passes):  # interleave dxl and baseline so noise hits both alike
            tables = [rng.choice(blocks, size=k, replace=False) for _ in range(requests + 3)]
            for t in tables[:3]:  # warm-up
                await eng.pull_blocks(key, cache, t.tolist(), t.tolist())
            t0 = time.perf_counter()
            for t in tables[3:]:
                await eng.pull_blocks(key, cache, t.tolist(), t.tolist())
            dxl_gbps.append(requests * request_bytes / (time.perf_counter() - t0) / 1e9)
            last = tables[-1]
            verified &= dst.matches(range(tensors), last, SEED, range(tensors), last)
            memcpy_pass(dst, local_src, tables[:3], block_bytes)  # warm-up
            secs = memcpy_pass(dst, local_src, tables[3:], block_bytes)
            base_gbps.append(requests * request_bytes / secs / 1e9)
    g, b = statistics.median(dxl_gbps), statistics.median(base_gbps)
    if not verified:  # an unverified speed is not a result
        g = dxl_gbps = None  # type: ignore[assignment]
    return {
        "transport": "cma",
        "op": "pull",
        "block_bytes": block_bytes,
        "layers": layers,
        "blocks_per_request": k,
        "pieces_per_request": k * tensors,
        "gbps": g and round(g, 3),
        "baseline": "memcpy-1thread",
        "baseline_gbps": round(b, 3),
        "ratio": g and round(g / b, 3),
        "passes": passes,
        "requests_per_pass": requests,
        "transfer_threads": threads,
        "gbps_passes": dxl_gbps and [round(x, 3) for x in dxl_gbps],
        "baseline_passes": [round(x, 3) for x in base_gbps],
        "verified": bool(verified),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--block-bytes", type=int, nargs="+", default=[64 << 10])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="LLMConfig.transfer_threads")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    ok = True
    for bb in args.block_bytes:
        parent, child = ctx.Pipe()
        target = ctx.Process(target=run_target, args=(args.layers, bb, child))
        target.start()
        try:
            if not parent.poll(120):
                raise SystemExit("target did not start")
            row = asyncio.run(
                measure(args.layers, bb, parent.recv(), args.passes, args.requests, args.threads)
            )
        finally:
            parent.send("done")
            target.join(30)
            if target.is_alive():
                target.kill()
        ok &= row["verified"]
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            if not row["verified"]:
                print(f"cma pull {bb // 1024:>5} KiB: UNVERIFIED (bytes differ), no result")
                continue
            print(
                f"cma pull {bb // 1024:>5} KiB x {row['pieces_per_request']} pieces: "
                f"{row['gbps']:.2f} GB/s vs memcpy {row['baseline_gbps']:.2f} GB/s -> "
                f"ratio {row['ratio']:.2f} (passes {row['gbps_passes']} / "
                f"{row['baseline_passes']})",
                flush=True,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
