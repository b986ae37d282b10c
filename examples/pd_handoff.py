"""P/D request handoff: a router, one prefill process and one decode process.

Each request flows router -> prefill (computes its KV into free blocks, offers them: a ticket)
-> router (forwards the ticket as JSON, as a router forwards ``kv_transfer_params``) -> decode
(takes free blocks, fetches the ticket into them, checks every byte) -> done. The prefill frees
a request's blocks only when ``finished()`` reports its offer ended (exactly once, whatever the
end), so blocks are never reused while a copy may still touch them. Some requests do not get
that far, to show how ends are reported: every ``--abort-every``-th is cancelled by its client
after prefill (the router has the prefill abort it: ABORTED), and every ``--expire-every``-th
reaches the decode only after its short lease ran out (the prefill sees EXPIRED, the decode's
fetch fails with a FetchError that says why).

The prefill and the decode are separate processes with their own event loops and engines; the
router talks to them over loopback sockets with JSON lines (requests multiplexed by id). At the
end it prints how each request ended on each side, whether every byte matched, and latency
percentiles. Exit status 0 means every byte was right and every end was the expected one.

    python examples/pd_handoff.py                      # 64 requests, 8 at a time
    python examples/pd_handoff.py --requests 200 --concurrency 16 --transport tcp
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing as mp
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

PREFILL_ID, DECODE_ID = 1, 2
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


# ---------------------------------------------------------------- the KV a request computes
def request_kv(seed: int, tensor: int, nblocks: int, block_bytes: int) -> np.ndarray:
    """What prefill computes for a request: (blocks, words) uint64 per tensor, unique to the
    request (``seed``), the tensor and the position of the block in the request."""
    words = block_bytes // 8
    base = np.arange(nblocks * words, dtype=np.uint64) + np.uint64(seed * 1_000_003)
    salt = np.uint64((tensor + 1) * 0x9E3779B97F4A7C15 & (2**64 - 1))
    return (base ^ salt).reshape(nblocks, words)


class Blocks:
    """A free list of cache blocks; ``take`` waits while too few are free (back-pressure)."""

    def __init__(self, n: int) -> None:
        self.free = list(range(n))
        self.changed = asyncio.Condition()

    async def take(self, k: int) -> list[int]:
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.free) >= k)
            out, self.free = self.free[:k], self.free[k:]
            return out

    async def give(self, blocks: list[int]) -> None:
        async with self.changed:
            self.free += blocks
            self.changed.notify_all()


# ---------------------------------------------------------------- JSON lines, multiplexed
class JsonServer:
    """A loopback server: each line ``{"id", ...}`` is handled concurrently; the reply carries
    the same id."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.clients: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0, limit=1 << 24)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self.clients.add(me)
        tasks = set()

        async def one(msg: dict[str, Any]) -> None:
            try:
                reply = await self.handler(msg)
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            writer.write(json.dumps({"id": msg["id"], **reply}).encode() + b"\n")

        try:
            while line := await reader.readline():
                task = asyncio.create_task(one(json.loads(line)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            writer.close()
            self.clients.discard(me)

    async def close(self) -> None:
        """Stop accepting, and let connected clients finish (the router hangs up first)."""
        assert self.server is not None
        self.server.close()
        if self.clients:
            await asyncio.wait(self.clients, timeout=10)


class Client:
    """The router's end of one process's JSON-lines connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.ids = itertools.count()
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.task = asyncio.create_task(self._read(reader))

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port, limit=1 << 24))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            msg = json.loads(line)
            self.waiting.pop(msg.pop("id")).set_result(msg)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        rid = next(self.ids)
        fut = self.waiting[rid] = asyncio.get_running_loop().create_future()
        self.writer.write(json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n")
        reply = await fut
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
        self.task.cancel()


# ---------------------------------------------------------------- processes
def engine_config(transport: str) -> Any:
    import dxl

    cfg = dxl.LLMConfig()
    cfg.listen_ip_info = "127.0.0.1:0"  # both listen: over tcp the prefill writes the decode
    cfg.transport = transport
    return cfg


def run_process(role: str, args: argparse.Namespace, conn: Any) -> None:
    """Process entry (spawn): one engine and its JSON-lines server, until the router quits."""
    main = prefill_main if role == "prefill" else decode_main
    asyncio.run(main(args, conn))


async def prefill_main(args: argparse.Namespace, conn: Any) -> None:
    import dxl
    from dxl.testing import KVBuffers

    kv = KVBuffers(2 * args.layers, args.blocks, args.block_bytes, fill=False)
    blocks = Blocks(args.blocks)
    started: dict[str, float] = {}
    ends: dict[str, dict[str, Any]] = {}
    ended = asyncio.Event()
    async with dxl.Engine(PREFILL_ID, dxl.LLMRole.PROMPT, engine_config(args.transport)) as eng:
        cache = await eng.register_blocks_cache(
            kv.desc(), kv.addrs, dxl.BlocksCacheKey(PREFILL_ID, 0), remote_accessible=True
        )

        async def watch() -> None:
            """Every offer ends exactly once: only then are its blocks free again."""
            async for f in eng.handoff.finished():
                seconds = time.perf_counter() - started.pop(f.request_id)
                if f.request_id in ends:
                    raise AssertionError(f"{f.request_id} ended twice")
                ends[f.request_id] = {"reason": f.reason.value, "s": seconds, "detail": f.detail}
                await blocks.give(f.block_ids)
                ended.set()

        async def handle(msg: dict[str, Any]) -> dict[str, Any]:
            op = msg["op"]
            if op == "prefill":  # compute the request's KV, then offer its blocks
                rid, n = msg["rid"], msg["nblocks"]
                ids = await blocks.take(n)
                for t in range(kv.num_tensors):
                    kv.blocks(t)[ids] = request_kv(msg["seed"], t, n, args.block_bytes)
                started[rid] = time.perf_counter()
                ticket = await eng.handoff.offer(
                    rid, cache, ids, lease_s=msg["lease_s"], num_tokens=n * 16
                )
                return {"ticket": ticket.to_json()}
            if op == "abort":  # the client went away before decode
                await eng.handoff.abort(msg["rid"])
                return {}
            if op == "wait_end":
                while msg["rid"] not in ends:
                    ended.clear()
                    await ended.wait()
                return ends[msg["rid"]]
            if op == "summary":
                return {"ends": ends, "live": eng.handoff.live(), "stats": eng.handoff.stats()}
            raise ValueError(f"unknown op {op!r}")

        watcher = asyncio.create_task(watch())
        server = JsonServer(handle)
        conn.send(await server.start())
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # the router quits
        await server.close()
        watcher.cancel()


async def decode_main(args: argparse.Namespace, conn: Any) -> None:
    import dxl
    from dxl.handoff import FetchError, Ticket
    from dxl.testing import KVBuffers

    kv = KVBuffers(2 * args.layers, args.blocks, args.block_bytes, fill=False)
    blocks = Blocks(args.blocks)
    async with dxl.Engine(DECODE_ID, dxl.LLMRole.DECODER, engine_config(args.transport)) as eng:
        cache = await eng.register_blocks_cache(kv.desc(), kv.addrs, remote_accessible=True)

        async def handle(msg: dict[str, Any]) -> dict[str, Any]:
            if msg["op"] == "summary":
                links = eng.stats()["links"]
                return {
                    "stats": eng.handoff.stats(),
                    "transport": links[PREFILL_ID]["transport"] if PREFILL_ID in links else "-",
                }
            ticket = Ticket.from_json(msg["ticket"])  # what the router forwarded
            n = len(ticket.block_ids)
            ids = await blocks.take(n)
            try:
                t0 = time.perf_counter()
                try:
                    await eng.handoff.fetch(ticket, cache, ids)
                except FetchError as exc:  # the offer is gone: nothing of it may be used
                    return {"ok": False, "why": str(exc), "status": exc.status_code.name}
                seconds = time.perf_counter() - t0
                good = all(
                    np.array_equal(
                        kv.blocks(t)[ids], request_kv(msg["seed"], t, n, args.block_bytes)
                    )
                    for t in range(kv.num_tensors)
                )
                # ... decode would run here; then the request's blocks are free again
                return {"ok": True, "verified": good, "s": seconds, "bytes": n * kv.num_tensors}
            finally:
                await blocks.give(ids)

        server = JsonServer(handle)
        conn.send(await server.start())
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # the router quits
        await server.close()


# ---------------------------------------------------------------- the router
async def route(args: argparse.Namespace, prefill: Client, decode: Client) -> int:
    rng = np.random.default_rng(args.seed)
    sizes = rng.integers(1, args.max_blocks + 1, size=args.requests)
    slots = asyncio.Semaphore(args.concurrency)
    results: dict[str, dict[str, Any]] = {}

    async def one(i: int) -> None:
        rid = f"req-{i:04d}"
        abort = args.abort_every and i % args.abort_every == args.abort_every - 1
        expire = not abort and args.expire_every and i % args.expire_every == args.expire_every - 1
        async with slots:
            t0 = time.perf_counter()
            lease = 0.05 if expire else 30.0
            got = await prefill.call(
                "prefill", rid=rid, nblocks=int(sizes[i]), seed=i + 1, lease_s=lease
            )
            ticket = got["ticket"]  # JSON: forwarded as is
            if abort:
                await prefill.call("abort", rid=rid)
                results[rid] = {"expect": "aborted"}
                return
            if expire:  # a decode that comes too late: the lease ran out first
                await prefill.call("wait_end", rid=rid)
            r = await decode.call("decode", ticket=ticket, seed=i + 1)
            r["expect"] = "expired" if expire else "done"
            r["e2e_s"] = time.perf_counter() - t0
            results[rid] = r

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.requests)))
    wall = time.perf_counter() - t0
    p = await prefill.call("summary")
    d = await decode.call("summary")
    return report(args, results, p, d, wall)


def pct_ms(values: list[float]) -> str:
    if not values:
        return "      -       -"
    p50, p99 = np.percentile(np.asarray(values) * 1e3, [50, 99]).tolist()
    return f"{p50:7.2f} {p99:7.2f}"


def report(
    args: argparse.Namespace,
    results: dict[str, dict[str, Any]],
    p: dict[str, Any],
    d: dict[str, Any],
    wall: float,
) -> int:
    ends = p["ends"]
    wrong = []
    for rid, r in sorted(results.items()):
        end = ends.get(rid, {}).get("reason")
        if end != r["expect"]:
            wrong.append(f"{rid}: expected {r['expect']}, the prefill says {end}")
        if r["expect"] == "done" and not (r.get("ok") and r.get("verified")):
            wrong.append(f"{rid}: {r.get('why') or 'bytes differ'}")
        if r["expect"] == "expired" and r.get("ok"):
            wrong.append(f"{rid}: fetched although its lease ran out")
    if len(ends) != len(results) or p["live"]:
        wrong.append(f"{len(ends)} ends for {len(results)} offers, {p['live']} still live")
    done = [r for r in results.values() if r["expect"] == "done" and r.get("ok")]
    late = [r for r in results.values() if r["expect"] == "expired"]
    counts = {k: sum(1 for e in ends.values() if e["reason"] == k) for k in ("done", "aborted")}
    counts["expired"] = sum(1 for e in ends.values() if e["reason"] == "expired")
    counts["failed"] = sum(1 for e in ends.values() if e["reason"] == "failed")
    moved = sum(r["bytes"] for r in done) * args.block_bytes
    print(
        f"{len(results)} requests through router -> prefill -> ticket -> decode "
        f"({d['transport']}, {args.concurrency} at a time, {wall:.2f} s)"
    )
    print(
        "prefill ends (each offer exactly once): "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    if late:
        print(f"late decodes told why: {late[0].get('status')}: {late[0].get('why')}")
    if wrong:
        print("PROBLEMS:")
        print("\n".join("  " + w for w in wrong[:20]))
    else:
        print(f"verified: every byte matches ({len(done)} requests, {moved / (1 << 20):.1f} MiB)")
    print("latency (ms)                       p50     p99")
    print("  router: prefill call -> decoded " + pct_ms([r["e2e_s"] for r in done]))
    print(
        "  prefill: offer -> done          "
        + pct_ms([e["s"] for e in ends.values() if e["reason"] == "done"])
    )
    print("  decode: fetch()                 " + pct_ms([r["s"] for r in done]))
    s = d["stats"]
    print(
        f"decode handoff stats: {s['fetch']['ops']} fetches, {s['bytes_received']} bytes in, "
        f"{sum(s['fetch_failures'].values())} failed ({s['fetch_failures']})"
    )
    return 1 if wrong else 0


async def router_main(args: argparse.Namespace) -> int:
    ctx = mp.get_context("spawn")
    procs, pipes, ports = [], [], []
    for role in ("prefill", "decode"):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=run_process, args=(role, args, theirs), name=f"dxl-{role}")
        proc.start()
        procs.append(proc)
        pipes.append(mine)
    loop = asyncio.get_running_loop()
    try:
        for conn in pipes:
            ports.append(await loop.run_in_executor(None, conn.recv))
        prefill, decode = [await Client.connect(port) for port in ports]
        try:
            return await route(args, prefill, decode)
        finally:
            await prefill.close()
            await decode.close()
    finally:
        for conn in pipes:
            with contextlib.suppress(OSError):
                conn.send("quit")
        for proc in procs:
            await loop.run_in_executor(None, proc.join, 30)
            if proc.is_alive():
                proc.kill()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--layers", type=int, default=8, help="layers (K and V: 2 tensors each)")
    p.add_argument("--blocks", type=int, default=256, help="blocks per tensor on each side")
    p.add_argument("--block-bytes", type=int, default=16 << 10)
    p.add_argument("--max-blocks", type=int, default=16, help="most blocks per request")
    p.add_argument("--abort-every", type=int, default=10, help="0: no aborts")
    p.add_argument("--expire-every", type=int, default=13, help="0: no expiries")
    p.add_argument("--transport", default="auto", choices=("auto", "cma", "tcp"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_blocks * args.concurrency > args.blocks:
        p.error("--blocks must hold --max-blocks for every request in flight")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(router_main(parse())))
