"""tcp transport pull GB/s (``dxl.tcp.TcpTransport`` against a ``DataServer``) beside a raw
socket baseline, on loopback, in the same run.

Workload: the target process owns 64 tensors (each its own allocation, registered in the region
registry) of N blocks; each request pulls k random, distinct block ids of every tensor into
k other random ids of the initiator's 64 tensors: 4096 pieces at 4 KiB (16 MiB per request),
1024 at 256 KiB (256 MiB per request), fewer only where two neighbours happen to coalesce.
Every pull is verified byte for byte (outside the timing).

Baseline: the most plain TCP streams move between the same two processes: the initiator sends
a 16-byte request, the target answers with ``sendall`` of one contiguous buffer, the initiator
takes it with ``recv_into(..., MSG_WAITALL)`` into one contiguous buffer: each a single syscall
in C inside CPython's socket module (no Python per chunk), with the same socket buffer sizes as
the transport, over as many parallel streams as the transport uses for that request size (the
total cut into equal contiguous parts, one thread each). It needs no protocol, no piece list and
no scatter/gather, so it bounds what the transport could do. Passes alternate tcp and raw so
noise hits both alike; the medians are compared. Compare ``--streams 1`` for one stream each.

    python benchmarks/tcp_vs_raw_socket.py                        # 4 KiB and 256 KiB, 5 passes
    python benchmarks/tcp_vs_raw_socket.py --streams 1 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# numpy's OpenBLAS threads spin after any BLAS call and steal the CPUs both measurements need.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

TENSORS, SEED = 64, 31
SHAPES = {4096: (1024, 64), 256 << 10: (32, 16)}  # block bytes -> (blocks per tensor, k)


def shape_for(block_bytes: int) -> tuple[int, int]:
    if block_bytes in SHAPES:
        return SHAPES[block_bytes]
    k = max(1, min(64, (256 << 20) // (TENSORS * block_bytes)))
    return max(2 * k, (64 << 20) // (TENSORS * block_bytes)), k


def _tune(sock: socket.socket, sock_buf: int | None) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sock_buf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sock_buf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sock_buf)


def raw_pattern(nbytes: int) -> np.ndarray:
    return (np.arange(nbytes // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)).view(np.uint8)


def raw_serve(lsock: socket.socket, buf: np.ndarray, sock_buf: int | None) -> None:
    """Accept raw streams forever; each answers (offset, n) with sendall(buf[offset:][:n])."""
    view = memoryview(buf)

    def serve(conn: socket.socket) -> None:
        with conn:
            while True:
                hdr = conn.recv(16, socket.MSG_WAITALL)
                if len(hdr) < 16:
                    return
                off, n = struct.unpack("<QQ", hdr)
                conn.sendall(view[off : off + n])

    while True:
        conn, _ = lsock.accept()
        _tune(conn, sock_buf)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


async def target_main(block_bytes: int, threads: int, sock_buf: int | None, conn) -> None:
    from dxl.memory.regions import RegionRegistry
    from dxl.testing import KVBuffers
    from dxl.transport.tcp_server import DataServer

    blocks, k = shape_for(block_bytes)
    kv = KVBuffers(TENSORS, blocks, block_bytes, seed=SEED)
    regions = RegionRegistry()
    for addr in kv.addrs:
        regions.add(addr, blocks * block_bytes)
    raw = raw_pattern(k * TENSORS * block_bytes)
    lsock = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=raw_serve, args=(lsock, raw, sock_buf), daemon=True).start()
    srv = await DataServer.start(
        "127.0.0.1", 0, None, registry=regions, threads=threads, sock_buf=sock_buf
    )
    conn.send((srv.address, lsock.getsockname(), kv.addrs))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    await srv.close()
    regions.close()  # frees the regions with it


def run_target(block_bytes: int, threads: int, sock_buf: int | None, conn) -> None:
    asyncio.run(target_main(block_bytes, threads, sock_buf, conn))


def measure(
    block_bytes: int,
    data_addr: tuple[str, int],
    raw_addr: tuple[str, int],
    src_addrs: list[int],
    passes: int,
    streams: int,
    sock_buf: int | None,
) -> dict:
    from dxl import _ffi
    from dxl.memory.plan import block_pieces
    from dxl.testing import KVBuffers
    from dxl.transport.tcp import TcpTransport

    blocks, k = shape_for(block_bytes)
    total = k * TENSORS * block_bytes
    dst = KVBuffers(TENSORS, blocks, block_bytes, fill=False)
    dst_bases = np.asarray(dst.addrs, dtype=np.uint64)
    src_bases = np.asarray(src_addrs, dtype=np.uint64)
    tr = TcpTransport(data_addr, None, streams=streams, sock_buf=sock_buf, timeout_ms=60_000)
    # The raw baseline gets as many streams as the transport uses for this request size.
    threshold = _ffi.lib.dxl_tcp_stream_threshold(0)
    nraw = max(1, min(streams, total // threshold))
    raws = [socket.create_connection(raw_addr) for _ in range(nraw)]
    for r in raws:
        _tune(r, sock_buf)
    raw_buf = np.zeros(total, dtype=np.uint8)
    raw_view = memoryview(raw_buf)
    cuts = [total * j // nraw // 4096 * 4096 for j in range(nraw)] + [total]
    pool = ThreadPoolExecutor(max(1, nraw - 1))

    def raw_one(j: int) -> None:
        off, end = cuts[j], cuts[j + 1]
        raws[j].sendall(struct.pack("<QQ", off, end - off))
        while off < end:
            n = raws[j].recv_into(raw_view[off:end], end - off, socket.MSG_WAITALL)
            if n == 0:
                raise RuntimeError("raw sender closed")
            off += n

    def raw_pass() -> float:
        t0 = time.perf_counter()
        futs = [pool.submit(raw_one, j) for j in range(1, nraw)]
        raw_one(0)
        for f in futs:
            f.result()
        return time.perf_counter() - t0

    rng = np.random.default_rng(0)
    tcp_gbps, raw_gbps, pieces = [], [], 0
    verified = True
    try:
        for i in range(passes + 1):  # pass 0 warms both paths up and is not counted
            src_ids = rng.choice(blocks, size=k, replace=False)
            dst_ids = rng.choice(blocks, size=k, replace=False)
            plan = block_pieces(dst_bases, src_bases, dst_ids, src_ids, block_bytes)
            pieces = plan.count
            t0 = time.perf_counter()
            moved = tr.read(plan)
            secs = time.perf_counter() - t0
            verified &= moved == total
            verified &= dst.matches(range(TENSORS), dst_ids, SEED, range(TENSORS), src_ids)
            raw_buf[:] = 0
            rsecs = raw_pass()
            if i == 0:
                verified &= np.array_equal(raw_buf, raw_pattern(total))
                continue
            tcp_gbps.append(total / secs / 1e9)
            raw_gbps.append(total / rsecs / 1e9)
    finally:
        tr.close()
        for r in raws:
            r.close()
        pool.shutdown()
    g, b = statistics.median(tcp_gbps), statistics.median(raw_gbps)
    return {
        "transport": "tcp",
        "op": "pull",
        "block_bytes": block_bytes,
        "pieces_per_request": pieces,
        "bytes_per_request": total,
        "streams": streams,
        "raw_streams": nraw,
        "sock_buf": sock_buf,
        "gbps": round(g, 3) if verified else None,
        "baseline": "raw-socket-sendall-recv_into",
        "baseline_gbps": round(b, 3),
        "ratio": round(g / b, 3) if verified else None,
        "passes": passes,
        "gbps_passes": [round(x, 3) for x in tcp_gbps],
        "baseline_passes": [round(x, 3) for x in raw_gbps],
        "verified": bool(verified),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--block-bytes", type=int, nargs="+", default=[4096, 256 << 10])
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--streams", type=int, default=4, help="TcpTransport streams")
    p.add_argument("--server-threads", type=int, default=2, help="DataServer threads")
    p.add_argument(
        "--sock-buf", type=int, default=0, help="SO_SNDBUF/SO_RCVBUF (default 0: autotuning)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    sock_buf = args.sock_buf or None
    ctx = mp.get_context("spawn")
    ok = True
    if not args.json:
        print(
            f"{'block':>8} {'pieces':>7} {'MiB/req':>8} {'streams':>7} {'tcp GB/s':>9} "
            f"{'raw GB/s':>9} {'ratio':>6}  (server threads {args.server_threads}, "
            f"sock_buf {sock_buf}, {os.cpu_count()} CPUs)"
        )
    for bb in args.block_bytes:
        parent, child = ctx.Pipe()
        target = ctx.Process(target=run_target, args=(bb, args.server_threads, sock_buf, child))
        target.start()
        try:
            if not parent.poll(120):
                raise SystemExit("target did not start")
            data_addr, raw_addr, src_addrs = parent.recv()
            row = measure(bb, data_addr, raw_addr, src_addrs, args.passes, args.streams, sock_buf)
        finally:
            parent.send("done")
            target.join(30)
            if target.is_alive():
                target.kill()
        ok &= row["verified"]
        if args.json:
            print(json.dumps(row), flush=True)
        elif not row["verified"]:
            print(f"{bb // 1024:>5} KiB: UNVERIFIED (bytes differ), no result", flush=True)
        else:
            print(
                f"{bb // 1024:>5} KiB {row['pieces_per_request']:>7} "
                f"{row['bytes_per_request'] / (1 << 20):>8.0f} {row['raw_streams']:>7} "
                f"{row['gbps']:>9.2f} {row['baseline_gbps']:>9.2f} {row['ratio']:>6.2f}  "
                f"tcp {row['gbps_passes']} raw {row['baseline_passes']}",
                flush=True,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
