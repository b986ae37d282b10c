"""Handoff metrics over HTTP: a prefill and a decode engine hand requests off while
``/metrics`` (Prometheus text) and ``/metrics.json`` serve their counters and histograms.

Both engines run on one event loop here (in a real deployment each process serves its own
engine's metrics the same way). Requests flow offer -> ticket -> fetch -> done; every fifth
offer is left to expire (short lease), every seventh is aborted by the prefill, and every third
fetch first renews its ticket's lease, so every counter moves. Needs the metrics extra
(``pip install 'dxl[metrics]'``).

    python examples/handoff_metrics.py --port 9400          # then: curl localhost:9400/metrics
    python examples/handoff_metrics.py --requests 20 --scrape   # run 20, print one scrape, exit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

PREFILL_ID, DECODE_ID = 1, 2
PREFILL_SEED = 5


async def scrape(port: int, path: str) -> str:
    """GET ``path`` from our own endpoint (what Prometheus does every scrape interval)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"scrape of {path} failed: {head.decode()!r}")
    return body.decode()


async def main(args: argparse.Namespace) -> int:
    import numpy as np

    import dxl
    from dxl.handoff import Ended, FetchError, metrics
    from dxl.testing import KVBuffers

    tensors = 2 * args.layers
    pkv = KVBuffers(tensors, args.blocks, args.block_bytes, seed=PREFILL_SEED)
    dkv = KVBuffers(tensors, args.blocks, args.block_bytes, fill=False)
    configs = []
    for _ in range(2):  # both listen: over tcp the prefill writes into the decode's server
        cfg = dxl.LLMConfig()
        cfg.listen_ip_info = "127.0.0.1:0"
        cfg.transport = args.transport
        configs.append(cfg)
    rng = np.random.default_rng(0)
    bad = 0
    async with (
        dxl.Engine(PREFILL_ID, dxl.LLMRole.PROMPT, configs[0]) as prefill,
        dxl.Engine(DECODE_ID, dxl.LLMRole.DECODER, configs[1]) as decode,
    ):
        pcache = await prefill.register_blocks_cache(
            pkv.desc(), pkv.addrs, dxl.BlocksCacheKey(PREFILL_ID, 0), remote_accessible=True
        )
        dcache = await decode.register_blocks_cache(dkv.desc(), dkv.addrs, remote_accessible=True)
        server = await metrics.serve([prefill, decode], "127.0.0.1", args.port)
        port = server.sockets[0].getsockname()[1]
        print(f"serving http://127.0.0.1:{port}/metrics and /metrics.json", flush=True)
        i = 0
        while args.requests == 0 or i < args.requests:
            rid = f"req-{i}"
            src = rng.choice(args.blocks, args.max_blocks, replace=False).tolist()
            dst = rng.choice(args.blocks, args.max_blocks, replace=False).tolist()
            expire = i % 5 == 4
            ticket = await prefill.handoff.offer(rid, pcache, src, lease_s=0.05 if expire else 30.0)
            wire = ticket.to_json()  # what a router forwards
            if expire:  # nobody fetches it: the prefill sees it end EXPIRED
                pass
            elif i % 7 == 6:
                await prefill.handoff.abort(rid)
            else:
                if i % 3 == 2:
                    await decode.handoff.renew(wire)
                try:
                    await decode.handoff.fetch(wire, dcache, dst)
                except FetchError as exc:
                    print(f"{rid}: fetch failed: {exc}")
                    bad += 1
                else:
                    if not dkv.matches(range(tensors), dst, PREFILL_SEED, range(tensors), src):
                        print(f"{rid}: bytes differ")
                        bad += 1
            i += 1
            if args.requests == 0:
                await asyncio.sleep(args.interval)
        # every offer ends exactly once; wait for the expiring ones too
        ends: dict[str, Ended] = {}
        async with asyncio.timeout(60):
            async for f in prefill.handoff.finished():
                ends[f.request_id] = f.reason
                if len(ends) == i:
                    break
        counts = {r.value: sum(1 for e in ends.values() if e is r) for r in Ended}
        print("ends:", counts)
        if args.scrape:
            print(await scrape(port, "/metrics"), end="")
        elif args.linger:
            print(f"serving for {args.linger:g} s more", flush=True)
            await asyncio.sleep(args.linger)
        server.close()
        await server.wait_closed()
    print("failures", bad)
    return 1 if bad else 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="HTTP port (default: any free one)")
    p.add_argument("--requests", type=int, default=0, help="handoffs to run (0: until Ctrl-C)")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between requests (0)")
    p.add_argument("--scrape", action="store_true", help="print one /metrics scrape, then exit")
    p.add_argument("--linger", type=float, default=0, help="serve this long after the last")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--max-blocks", type=int, default=8, help="blocks per request")
    p.add_argument("--block-bytes", type=int, default=16 << 10)
    p.add_argument("--transport", default="auto", choices=("auto", "cma", "tcp"))
    return p.parse_args(argv)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(asyncio.run(main(parse())))
