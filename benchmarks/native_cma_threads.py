"""Tune the CMA thread split: dxl_cma_transfer pulls (1 and 2 threads) against memcpy.

Workload (the project's anchors, shared/anchors/cpu_peers.md): a source process owns 2L tensors
(L = 32 layers x K, V), each its own allocation of N blocks of B bytes, at least 512 MiB in all.
One request pulls k random, distinct, unsorted block ids of every tensor, block b to block b:
k * 2L pieces (4096 for k = 64). The baseline is ``dxl_copy_pieces`` with one thread, copying the
same pieces between two caches of this process. Each request uses new ids; the methods take
turns on each request; cells are medians over requests. GB/s is 1e9 bytes/s.

Part 2 sweeps the request size with 16 KiB pieces and prints where two threads start to beat one:
the split threshold (bytes per extra thread, ``dxl_split_threshold``) should sit about there.

    python benchmarks/native_cma_threads.py                 # full run, about 20 s
    python benchmarks/native_cma_threads.py --cache-mib 32 --requests 3   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable

import numpy as np

from dxl._ffi import as_u64_ptr, check, ffi, lib

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def make_cache(tensors: int, tensor_bytes: int, seed: int) -> list[np.ndarray]:
    """Tensors filled with a pattern unique per 8-byte word (seed 0: the source's pattern)."""
    words = tensor_bytes // 8
    base = np.arange(words, dtype=np.uint64) * GOLDEN
    out = []
    for t in range(tensors):
        arr = np.empty(words, dtype=np.uint64)
        np.add(base, np.uint64(t * words + seed), out=arr)
        out.append(arr.view(np.uint8))
    return out


def serve(tensors: int, tensor_bytes: int) -> None:
    """The source process: build the cache, print its addresses, wait for stdin to close."""
    cache = make_cache(tensors, tensor_bytes, 0)
    print(json.dumps([int(a.ctypes.data) for a in cache]), flush=True)
    sys.stdin.read()


def pieces(addrs: np.ndarray, ids: np.ndarray, block: int) -> np.ndarray:
    """Start addresses of blocks `ids` of every tensor, tensor-major."""
    return (addrs[:, None] + ids[None, :].astype(np.uint64) * np.uint64(block)).ravel()


def timed(what: str, fn: Callable[..., int], *args: object) -> float:
    """Seconds one native call takes; raises if it failed."""
    t0 = time.perf_counter()
    rc = fn(*args)
    elapsed = time.perf_counter() - t0
    check(rc, what)
    return elapsed


def run_block_size(args: argparse.Namespace, block: int, k: int) -> dict[str, float]:
    tensors = 2 * args.layers
    nblocks = max(4 * k, (args.cache_mib << 20) // (tensors * block))
    tbytes = nblocks * block
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(tensors), str(tbytes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        remote = np.array(json.loads(child.stdout.readline()), dtype=np.uint64)
        src = make_cache(tensors, tbytes, 0)  # the same bytes as the child's, for memcpy
        dst = make_cache(tensors, tbytes, 1)
        src_addrs = np.array([a.ctypes.data for a in src], dtype=np.uint64)
        dst_addrs = np.array([a.ctypes.data for a in dst], dtype=np.uint64)
        out = ffi.new("dxl_peer_t **")
        check(lib.dxl_peer_open(child.pid, out), "open source")
        peer = ffi.gc(out[0], lib.dxl_peer_close)
        rng = np.random.default_rng(block)
        methods = {"memcpy": None, "cma t=1": 1, "cma t=2": 2}
        times: dict[str, list[float]] = {m: [] for m in methods}
        n = tensors * k
        length = np.full(n, block, dtype=np.uint64)
        done = ffi.new("uint64_t *")
        for r in range(args.warmup + args.requests):
            ids = rng.choice(nblocks, k, replace=False)
            s, rem, d = (
                pieces(src_addrs, ids, block),
                pieces(remote, ids, block),
                pieces(dst_addrs, ids, block),
            )
            ps, pr, pd, pl = as_u64_ptr(s), as_u64_ptr(rem), as_u64_ptr(d), as_u64_ptr(length)
            order = list(methods)
            order = order[r % 3 :] + order[: r % 3]
            for m in order:
                threads = methods[m]
                if threads is None:
                    t = timed("copy", lib.dxl_copy_pieces, pd, ps, pl, n, 1)
                else:
                    t = timed("pull", lib.dxl_cma_transfer, peer, 0, pd, pr, pl, n, threads, done)
                    assert done[0] == n * block
                if r == 0:  # verify the bytes once per method
                    got = b"".join(
                        dst[ti][int(b) * block : (int(b) + 1) * block].tobytes()
                        for ti in range(tensors)
                        for b in ids
                    )
                    want = b"".join(
                        src[ti][int(b) * block : (int(b) + 1) * block].tobytes()
                        for ti in range(tensors)
                        for b in ids
                    )
                    assert zlib.crc32(got) == zlib.crc32(want), m
                    for ti in range(tensors):  # scrub, so the next method must move them again
                        for b in ids:
                            dst[ti][int(b) * block : (int(b) + 1) * block] = 0xAB
                if r >= args.warmup:
                    times[m].append(t)
        ffi.release(peer)
        return {m: n * block / statistics.median(v) / 1e9 for m, v in times.items()}
    finally:
        child.stdin.close()
        child.wait()
        child.stdout.close()


def size_sweep(args: argparse.Namespace) -> list[tuple[int, float, float]]:
    """Pull n pieces of 16 KiB from one source tensor with 1 thread and with a forced 2-way split.
    Returns (request bytes, GB/s 1 thread, GB/s 2 threads)."""
    block = 16 << 10
    nblocks = (args.cache_mib << 20) // block
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "1", str(nblocks * block)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    rows = []
    try:
        remote = int(json.loads(child.stdout.readline())[0])
        dst = make_cache(1, nblocks * block, 1)[0]
        out = ffi.new("dxl_peer_t **")
        check(lib.dxl_peer_open(child.pid, out), "open source")
        peer = ffi.gc(out[0], lib.dxl_peer_close)
        rng = np.random.default_rng(5)
        done = ffi.new("uint64_t *")
        old = lib.dxl_split_threshold(1)  # split whenever max_threads allows
        try:
            for count in (4, 8, 16, 32, 64, 128, 256, 512, 1024):
                if count > nblocks:
                    break
                length = np.full(count, block, dtype=np.uint64)
                t1: list[float] = []
                t2: list[float] = []
                for r in range(args.sweep_reps):
                    ids = rng.choice(nblocks, count, replace=False).astype(np.uint64)
                    rem = np.uint64(remote) + ids * np.uint64(block)
                    d = np.uint64(dst.ctypes.data) + ids * np.uint64(block)
                    call = (peer, 0, as_u64_ptr(d), as_u64_ptr(rem), as_u64_ptr(length), count)
                    for threads, acc in ((1, t1), (2, t2)) if r % 2 else ((2, t2), (1, t1)):
                        acc.append(timed("pull", lib.dxl_cma_transfer, *call, threads, done))
                nbytes = count * block
                g1, g2 = (nbytes / statistics.median(t) / 1e9 for t in (t1, t2))
                rows.append((nbytes, g1, g2))
        finally:
            lib.dxl_split_threshold(old)
        ffi.release(peer)
    finally:
        child.stdin.close()
        child.wait()
        child.stdout.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--serve", nargs=2, type=int, metavar=("TENSORS", "BYTES"), help=argparse.SUPPRESS
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--cache-mib", type=int, default=512, help="source cache size")
    parser.add_argument("--requests", type=int, default=12, help="timed requests per size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sweep-reps", type=int, default=60)
    parser.add_argument("--blocks-kib", default="4,16,64,256", help="block sizes of the table")
    parser.add_argument("--no-table", action="store_true", help="run the size sweep only")
    parser.add_argument("--no-sweep", action="store_true", help="run the table only")
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return

    print(f"split threshold (bytes per extra thread): {lib.dxl_split_threshold(0)}")
    if not args.no_table:
        table(args)
    if not args.no_sweep:
        sweep(args)


def table(args: argparse.Namespace) -> None:
    print(
        "| B | k | pieces | MiB/req | memcpy GB/s | cma t=1 GB/s | cma t=2 GB/s "
        "| t=1/memcpy | t=2/memcpy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kib in (int(x) for x in args.blocks_kib.split(",")):
        block = kib << 10
        k = 16 if kib >= 256 else 64
        g = run_block_size(args, block, k)
        n = 2 * args.layers * k
        print(
            f"| {kib} KiB | {k} | {n} | {n * block / 2**20:.0f} | {g['memcpy']:.2f} "
            f"| {g['cma t=1']:.2f} | {g['cma t=2']:.2f} | {g['cma t=1'] / g['memcpy']:.2f} "
            f"| {g['cma t=2'] / g['memcpy']:.2f} |",
            flush=True,
        )


def sweep(args: argparse.Namespace) -> None:
    print("\nrequest-size sweep, 16 KiB pieces, forced 2-way split vs 1 thread (median):")
    print("| KiB/req | t=1 GB/s | t=2 GB/s | t=2/t=1 |")
    print("|---|---|---|---|")
    for nbytes, g1, g2 in size_sweep(args):
        print(f"| {nbytes >> 10} | {g1:.2f} | {g2:.2f} | {g2 / g1:.2f} |", flush=True)


if __name__ == "__main__":
    main()
