"""``dxl bench --handoff``: request handoff beside plain ``pull_blocks``, and fan-in.

Two kinds of configuration, each in fresh processes (spawn): one or more *prefill host*
processes, each running prefill engines that offer blocks (:mod:`dxl.handoff`), and one
*decode* process that fetches them and also plays the router (it asks a prefill to offer over a
loopback socket and gets the ticket back as JSON, as a router forwards ``kv_transfer_params``).

- **latency** (one prefill engine, one decode engine; the shapes of ``dxl bench``): per request
  the prefill offers ``k`` random blocks of every tensor, the ticket goes to the decode, the
  decode fetches the blocks into the same block ids, and the prefill sees the offer end DONE.
  The handoff latency is measured on the prefill, from ``offer()`` to its ``finished()``
  reporting DONE (offer -> ticket -> fetch -> done); the decode's ``fetch()`` call is timed
  too. The baseline, measured in the same pass in alternating order, is a plain
  ``pull_blocks`` of the same blocks over the same link. Ratio = handoff / pull (p50 and p99).
- **fan-in** (``--fan-in N`` prefill engines, one decode engine): every prefill engine offers
  ``k`` blocks of every tensor (its cache holds exactly ``k`` blocks, in random order), and the
  decode fetches all N offers at once into N distinct destination regions; throughput = bytes
  / wall time from the first fetch started to the last one returned. The baseline, same pass,
  alternating order: one link's throughput, i.e. N offers of one prefill engine fetched one
  after another into the same N destination regions (the same bytes, the same destination
  memory). Ratio = fan-in / one link.

Every pass verifies the destination bytes (each prefill engine fills its cache with its own
pattern, so a block from the wrong engine fails), and every offer must have ended DONE on its
prefill; a configuration that fails either reports no number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np

from ..testing import KVBuffers
from .engines import LogCapture, run_loop
from .measure import BenchFailure, check_transport, median, percentiles_us, rounded
from .report import Progress, machine_line
from .workload import (
    Workload,
    clear,
    corrupt,
    destination_buffers,
    format_size,
    pass_tables,
    source_buffers,
    verify,
)

DECODE_ID = 2
PREFILL_BASE_ID = 100  # prefill engine i is cluster PREFILL_BASE_ID + i
FANIN_SEED_BASE = 1000  # prefill engine i fills its fan-in cache with pattern seed 1000 + i
PROBE_PASS = 1 << 20
FETCH_TIMEOUT_S = 300.0  # a loaded machine makes fetches slow, never failed
SYNC_KV_TIMEOUT_MS = 120_000
READY_TIMEOUT_S = 300
LINK_BATCH = 8  # fan-in: prefill engines linked at once before the warm-up
LINK_TIMEOUT_MS = 30_000
# fan-in: 64 engines in a couple of processes can starve an event loop for seconds on a
# small, loaded machine; three missed 1 s heartbeats would drop links mid-run
FANIN_HEARTBEAT_MS = 10_000
FANIN_MAX_BYTES = 4 << 30  # the decode's fan-in destination (and the prefills' caches, in all)
JOIN_TIMEOUT_S = 30


@dataclass(frozen=True)
class HandoffWorkload:
    """One ``--handoff`` configuration (``kind``: "latency" or "fanin")."""

    kind: str
    transport: str
    block_bytes: int
    layers: int
    num_blocks: int  # latency: blocks per prefill/decode tensor; fan-in: k (the offer)
    blocks_per_request: int
    requests: int = 20
    warmup: int = 3
    passes: int = 3
    prefills: int = 1
    hosts: int = 1  # prefill host processes the prefill engines are spread over
    seed: int = 0
    loop: str = "uvloop"
    transfer_threads: int | None = None
    debug_corrupt: bool = False  # flip a destination bit before verifying handoffs (tests)

    @property
    def tensors(self) -> int:
        return 2 * self.layers

    @property
    def request_bytes(self) -> int:
        return self.blocks_per_request * self.tensors * self.block_bytes

    @property
    def label(self) -> str:
        what = "handoff" if self.kind == "latency" else f"fan-in x{self.prefills}"
        return f"{self.transport} {what} {format_size(self.block_bytes)}"

    def as_workload(self) -> Workload:
        """The plain bench's view of the latency shapes (buffers, request tables)."""
        return Workload(
            self.transport,
            "pull",
            "async",
            self.block_bytes,
            self.layers,
            self.num_blocks,
            self.blocks_per_request,
            requests=self.requests,
            warmup=self.warmup,
            passes=self.passes,
            seed=self.seed,
            loop=self.loop,
        )

    def engines_of(self, host: int) -> range:
        """The prefill engine indices host process ``host`` runs."""
        per = -(-self.prefills // self.hosts)
        return range(host * per, min(self.prefills, (host + 1) * per))


def _config(hw: HandoffWorkload) -> Any:
    """Both sides listen: over tcp the offerer writes into the fetcher's data server."""
    from ..config import LLMConfig

    cfg = LLMConfig()
    cfg.listen_ip_info = "127.0.0.1:0"
    cfg.transport = hw.transport
    cfg.sync_kv_timeout = SYNC_KV_TIMEOUT_MS
    cfg.max_registered_addrs = max(240, 2 * hw.tensors)
    if hw.transfer_threads is not None:
        cfg.transfer_threads = hw.transfer_threads
    if hw.kind == "fanin":
        cfg.heartbeat_interval_ms = FANIN_HEARTBEAT_MS
    return cfg


def fanin_seed(engine: int) -> int:
    return FANIN_SEED_BASE + engine


# ================================================================== prefill host process
class _Prefill:
    """One prefill engine of a host: its cache, and when each of its offers started/ended."""

    def __init__(self, eng: Any, cache: Any, kv: KVBuffers) -> None:
        self.eng = eng
        self.cache = cache
        self.kv = kv
        self.started: dict[str, float] = {}
        self.ended: dict[str, tuple[str, float, str]] = {}
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        async for f in self.eng.handoff.finished():
            t1 = time.perf_counter()
            t0 = self.started.pop(f.request_id, t1)
            self.ended[f.request_id] = (f.reason.value, t1 - t0, f.detail)
            self.changed.set()

    async def offer(self, rid: str, blocks: list[int]) -> str:
        self.started[rid] = time.perf_counter()
        ticket = await self.eng.handoff.offer(rid, self.cache, blocks, lease_s=FETCH_TIMEOUT_S)
        return str(ticket.to_json())

    async def wait_ended(self, rids: Sequence[str], deadline_s: float) -> dict[str, Any]:
        async with asyncio.timeout(deadline_s):
            while any(r not in self.ended for r in rids):
                self.changed.clear()
                await self.changed.wait()
        return {r: self.ended.pop(r) for r in rids}


async def _host(hw: HandoffWorkload, host: int, conn: Connection, logs: LogCapture) -> None:
    from .. import BlocksCacheKey, Engine, LLMRole

    loop = asyncio.get_running_loop()
    prefills: dict[int, _Prefill] = {}
    async with contextlib.AsyncExitStack() as stack:
        for i in hw.engines_of(host):
            cid = PREFILL_BASE_ID + i
            eng = await stack.enter_async_context(Engine(cid, LLMRole.PROMPT, _config(hw)))
            if hw.kind == "latency":
                kv = source_buffers(hw.as_workload())
            else:
                kv = KVBuffers(hw.tensors, hw.num_blocks, hw.block_bytes, seed=fanin_seed(i))
            cache = await eng.register_blocks_cache(
                kv.desc(), kv.addrs, BlocksCacheKey(cid, 0), remote_accessible=True
            )
            prefills[i] = _Prefill(eng, cache, kv)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            """The router's requests, one JSON line each, answered in order."""
            while line := await reader.readline():
                req = json.loads(line)
                reply: dict[str, Any]
                try:
                    reply = await _router_op(prefills, req)
                except Exception as exc:
                    reply = {"error": f"{type(exc).__name__}: {exc}", "why": logs.why()}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=1 << 24)
        async with server:
            port = server.sockets[0].getsockname()[1]
            engines = {
                i: [PREFILL_BASE_ID + i, list(p.eng.listen_address)] for i, p in prefills.items()
            }
            conn.send(("ready", {"router": port, "engines": engines, "pid": os.getpid()}))
            with contextlib.suppress(EOFError):
                await loop.run_in_executor(None, conn.recv)  # "done", or the parent went
        for p in prefills.values():
            p.task.cancel()


async def _router_op(prefills: dict[int, _Prefill], req: dict[str, Any]) -> dict[str, Any]:
    op = req["op"]
    if op == "offer":  # [[engine, request id, blocks], ...] -> tickets (JSON strings)
        tickets = [await prefills[e].offer(rid, blocks) for e, rid, blocks in req["items"]]
        return {"tickets": tickets}
    if op == "ended":  # [[engine, request id], ...] -> [[reason, seconds, detail], ...]
        out = []
        for e, rid in req["items"]:
            out.append((await prefills[e].wait_ended([rid], req["deadline_s"]))[rid])
        return {"ended": out}
    if op == "stats":
        return {"stats": {e: p.eng.stats()["handoff"] for e, p in prefills.items()}}
    raise ValueError(f"unknown router op {op!r}")


def host_main(hw: HandoffWorkload, host: int, conn: Connection, verbose: bool = False) -> None:
    """Process entry (spawn): run prefill engines until the parent says done or goes away."""
    logs = LogCapture(verbose)
    try:
        run_loop(_host(hw, host, conn, logs), hw.loop)
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        detail = logs.why()
        msg = f"prefill host failed: {type(exc).__name__}: {exc}" + (
            f" ({detail})" if detail else ""
        )
        with contextlib.suppress(OSError):
            conn.send(("error", msg))


# ================================================================== decode process
class _Router:
    """The decode's connection to one prefill host (requests answered in order)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, port: int) -> _Router:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
        return cls(reader, writer)

    async def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        async with self._lock:
            self._writer.write(json.dumps({"op": op, **fields}).encode() + b"\n")
            line = await self._reader.readline()
        if not line:
            raise BenchFailure("a prefill host closed its router connection")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            detail = f" (dxl log: {reply['why']})" if reply.get("why") else ""
            raise BenchFailure(f"prefill host: {reply['error']}{detail}")
        return reply

    async def offer(self, items: list[tuple[int, str, list[int]]]) -> list[str]:
        tickets: list[str] = (await self.ask("offer", items=items))["tickets"]
        return tickets

    async def ended(self, items: list[tuple[int, str]]) -> list[tuple[str, float, str]]:
        out = (await self.ask("ended", items=items, deadline_s=FETCH_TIMEOUT_S))["ended"]
        bad = [(rid, o) for (_, rid), o in zip(items, out, strict=True) if o[0] != "done"]
        if bad:
            rid, (reason, _, detail) = bad[0]
            raise BenchFailure(
                f"{len(bad)} offer(s) did not end done on the prefill; {rid}: {reason} {detail}"
            )
        return [(str(o[0]), float(o[1]), str(o[2])) for o in out]

    def close(self) -> None:
        self._writer.close()


class _Decode:
    """The decode engine, its cache and routers to the prefill hosts."""

    def __init__(
        self,
        hw: HandoffWorkload,
        eng: Any,
        cache: Any,
        kv: KVBuffers,
        routers: list[_Router],
        progress: Callable[[int, str], None],
        endpoints: dict[int, tuple[int, tuple[str, int]]],
    ) -> None:
        self.endpoints = endpoints  # prefill engine -> (cluster id, listen address)
        self.hw = hw
        self.eng = eng
        self.cache = cache
        self.kv = kv
        self.routers = routers
        self.progress = progress

    def router_of(self, engine: int) -> _Router:
        per = -(-self.hw.prefills // self.hw.hosts)
        return self.routers[engine // per]

    async def handoff(self, engine: int, rid: str, src: list[int], dst: list[int]) -> float:
        """One handoff, as a router drives it: ask for the offer, forward the ticket, fetch.
        Returns the seconds of the decode's ``fetch()`` call."""
        (ticket,) = await self.router_of(engine).offer([(engine, rid, src)])
        t0 = time.perf_counter()
        await self.eng.handoff.fetch(ticket, self.cache, dst, timeout_s=FETCH_TIMEOUT_S)
        return time.perf_counter() - t0

    async def link_transport(self) -> str:
        links = self.eng.stats()["links"]
        kinds = {str(v["transport"]) for v in links.values()}
        if not kinds:
            raise BenchFailure("the decode holds no link after a fetch")
        return "/".join(sorted(kinds))

    async def offerer_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for r in self.routers:
            out.update((await r.ask("stats"))["stats"])
        return out


async def _latency(d: _Decode) -> dict[str, Any]:
    """Probe, then passes of handoffs and plain pulls of the same blocks (alternating order)."""
    from .. import BlocksCacheKey

    hw, w = d.hw, d.hw.as_workload()
    key = BlocksCacheKey(PREFILL_BASE_ID, 0)
    (probe,) = pass_tables(w.seed, PROBE_PASS, w.num_blocks, w.blocks_per_request, 1)
    clear(d.kv)
    await d.handoff(0, "probe", probe.tolist(), probe.tolist())
    await d.router_of(0).ended([(0, "probe")])
    verified = verify(d.kv, probe, strict=True)
    link = await d.link_transport()
    check_transport(hw.transport, link)
    d.progress(1, f"{hw.label}: probe")
    res: dict[str, list[float]] = {
        k: [] for k in ("h50", "h99", "f50", "f99", "p50", "p99", "r50", "r99")
    }

    async def handoffs(p: int, tables: list[np.ndarray]) -> bool:
        d.progress(0, f"{hw.label}: pass {p + 1}/{hw.passes} handoff")
        clear(d.kv)
        fetch_s, rids = [], []
        for i, t in enumerate(tables):
            rid = f"p{p}-r{i}"
            s = await d.handoff(0, rid, t.tolist(), t.tolist())
            if i >= hw.warmup:
                fetch_s.append(s)
                rids.append(rid)
        ended = await d.router_of(0).ended([(0, rid) for rid in rids])
        if hw.debug_corrupt:
            corrupt(d.kv, int(tables[-1][0]))
        ok = verify(d.kv, np.concatenate(tables))
        h50, h99 = percentiles_us([e[1] for e in ended])
        f50, f99 = percentiles_us(fetch_s)
        res["h50"].append(h50)
        res["h99"].append(h99)
        res["f50"].append(f50)
        res["f99"].append(f99)
        d.progress(1, f"{hw.label}: pass {p + 1}/{hw.passes} handoff")
        return ok

    async def pulls(p: int, tables: list[np.ndarray]) -> bool:
        d.progress(0, f"{hw.label}: pass {p + 1}/{hw.passes} pull_blocks")
        clear(d.kv)
        lat = []
        for i, t in enumerate(tables):
            ids = t.tolist()
            t0 = time.perf_counter()
            await d.eng.pull_blocks(key, d.cache, ids, ids)
            if i >= hw.warmup:
                lat.append(time.perf_counter() - t0)
        ok = verify(d.kv, np.concatenate(tables))
        p50, p99 = percentiles_us(lat)
        res["p50"].append(p50)
        res["p99"].append(p99)
        d.progress(1, f"{hw.label}: pass {p + 1}/{hw.passes} pull_blocks")
        return ok

    for p in range(hw.passes):
        tables = pass_tables(w.seed, p, w.num_blocks, w.blocks_per_request, hw.warmup + hw.requests)
        if p % 2:
            verified &= await pulls(p, tables)
            verified &= await handoffs(p, tables)
        else:
            verified &= await handoffs(p, tables)
            verified &= await pulls(p, tables)
        res["r50"].append(res["h50"][-1] / res["p50"][-1])
        res["r99"].append(res["h99"][-1] / res["p99"][-1])
    stats = await d.offerer_stats()
    ok = bool(verified)
    m = {k: median(v) for k, v in res.items()}
    return {
        "link_transport": link,
        "verified": ok,
        "handoff_p50_us": round(m["h50"], 1) if ok else None,
        "handoff_p99_us": round(m["h99"], 1) if ok else None,
        "fetch_p50_us": round(m["f50"], 1) if ok else None,
        "fetch_p99_us": round(m["f99"], 1) if ok else None,
        "pull_p50_us": round(m["p50"], 1),
        "pull_p99_us": round(m["p99"], 1),
        "ratio_p50": round(m["h50"] / m["p50"], 3) if ok else None,
        "ratio_p99": round(m["h99"] / m["p99"], 3) if ok else None,
        "handoff_p50_us_passes": rounded(res["h50"], 1) if ok else None,
        "pull_p50_us_passes": rounded(res["p50"], 1),
        "ratio_p50_passes": rounded(res["r50"]) if ok else None,
        "ratio_p99_passes": rounded(res["r99"]) if ok else None,
        "offerer": stats.get("0"),  # JSON: the host's keys are strings
        "fetcher": d.eng.stats()["handoff"],
        "error": None if ok else "destination bytes differ from the source: UNVERIFIED",
    }


def _fanin_layout(hw: HandoffWorkload) -> tuple[list[list[int]], list[list[int]]]:
    """Per prefill engine: its offered blocks (its k blocks, in a random order), and the
    decode blocks they land in (engine i: i*k .. i*k + k - 1)."""
    rng = np.random.default_rng([hw.seed, 7])
    k = hw.blocks_per_request
    src = [rng.permutation(hw.num_blocks)[:k].tolist() for _ in range(hw.prefills)]
    dst = [list(range(i * k, (i + 1) * k)) for i in range(hw.prefills)]
    return src, dst


def _fanin_ok(d: _Decode, src: list[list[int]], dst: list[list[int]], engines: list[int]) -> bool:
    """Decode region i holds prefill engine ``engines[i]``'s pattern of its offered blocks."""
    tensors = range(d.hw.tensors)
    return all(
        d.kv.matches(tensors, dst[i], fanin_seed(e), tensors, src[e]) for i, e in enumerate(engines)
    )


async def _link_all(d: _Decode) -> None:
    """Link the decode to every prefill engine, a few at a time, before anything is timed.

    A fetch links by itself when it has to, but 64 first fetches at once mean 64 link
    handshakes at once, and on a loaded 2-CPU machine some then miss the listener's
    handshake deadline (5 s): a decode links to its prefills ahead of traffic anyway."""
    from .. import LLMClusterInfo, LLMStatusCode

    ok = (LLMStatusCode.LLM_SUCCESS, LLMStatusCode.LLM_ALREADY_LINK)
    todo = sorted(d.endpoints.values())
    codes: list[Any] = []
    for _ in range(3):
        failed = []
        for lo in range(0, len(todo), LINK_BATCH):
            batch = todo[lo : lo + LINK_BATCH]
            infos = []
            for cid, (ip, port) in batch:
                info = LLMClusterInfo()
                info.remote_cluster_id = cid
                info.append_local_ip_info("127.0.0.1", 0)
                info.append_remote_ip_info(ip, port)
                infos.append(info)
            _, codes = await d.eng.link_clusters(infos, LINK_TIMEOUT_MS)
            failed += [e for e, code in zip(batch, codes, strict=True) if code not in ok]
        if not failed:
            return
        todo = failed
    raise BenchFailure(f"could not link to {len(todo)} prefill engine(s), e.g. {todo[0]}")


async def _fanin(d: _Decode) -> dict[str, Any]:
    """Warm-up round, then passes of N concurrent fetches (one per prefill engine) and of N
    sequential fetches from one prefill engine (alternating order)."""
    hw = d.hw
    n = hw.prefills
    src, dst = _fanin_layout(hw)
    nbytes = n * hw.request_bytes
    res: dict[str, list[float]] = {"fanin": [], "single": [], "f50": [], "f99": []}

    async def tickets(items: list[tuple[int, str, list[int]]]) -> list[str]:
        """Offers from every host at once, in ``items`` order."""
        by_host: dict[int, list[int]] = {}
        for j, (e, _, _) in enumerate(items):
            by_host.setdefault(d.routers.index(d.router_of(e)), []).append(j)
        answers = await asyncio.gather(
            *(d.routers[h].offer([items[j] for j in js]) for h, js in by_host.items())
        )
        out: list[str] = [""] * len(items)
        for (_, js), ts in zip(by_host.items(), answers, strict=True):
            for j, t in zip(js, ts, strict=True):
                out[j] = t
        return out

    async def ended(items: list[tuple[int, str]]) -> None:
        by_host: dict[int, list[tuple[int, str]]] = {}
        for e, rid in items:
            by_host.setdefault(d.routers.index(d.router_of(e)), []).append((e, rid))
        await asyncio.gather(*(d.routers[h].ended(it) for h, it in by_host.items()))

    async def fanin(tag: str) -> tuple[float, list[float], bool]:
        clear(d.kv)
        items = [(e, f"{tag}-e{e}", src[e]) for e in range(n)]
        ts = await tickets(items)
        lat: list[float] = [0.0] * n

        async def one(e: int) -> None:
            t1 = time.perf_counter()
            await d.eng.handoff.fetch(ts[e], d.cache, dst[e], timeout_s=FETCH_TIMEOUT_S)
            lat[e] = time.perf_counter() - t1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(e) for e in range(n)))
        wall = time.perf_counter() - t0
        await ended([(e, rid) for e, rid, _ in items])
        if hw.debug_corrupt:
            corrupt(d.kv, dst[-1][0])
        return wall, lat, _fanin_ok(d, src, dst, list(range(n)))

    async def single(tag: str) -> tuple[float, bool]:
        clear(d.kv)
        items = [(0, f"{tag}-s{i}", src[0]) for i in range(n)]
        ts = await tickets(items)
        t0 = time.perf_counter()
        for i in range(n):
            await d.eng.handoff.fetch(ts[i], d.cache, dst[i], timeout_s=FETCH_TIMEOUT_S)
        wall = time.perf_counter() - t0
        await ended([(0, rid) for _, rid, _ in items])
        return wall, _fanin_ok(d, src, dst, [0] * n)

    await _link_all(d)
    _, _, verified = await fanin("warm")  # touches every page
    ok_single = (await single("warm"))[1]
    verified &= ok_single
    link = await d.link_transport()
    check_transport(hw.transport, link)
    d.progress(1, f"{hw.label}: warm-up")
    for p in range(hw.passes):
        order = ("single", "fanin") if p % 2 else ("fanin", "single")
        for what in order:
            d.progress(0, f"{hw.label}: pass {p + 1}/{hw.passes} {what}")
            if what == "fanin":
                wall, lat, ok = await fanin(f"p{p}")
                f50, f99 = percentiles_us(lat)
                res["f50"].append(f50)
                res["f99"].append(f99)
                res["fanin"].append(nbytes / wall / 1e9)
            else:
                wall, ok = await single(f"p{p}")
                res["single"].append(nbytes / wall / 1e9)
            verified &= ok
            d.progress(1, f"{hw.label}: pass {p + 1}/{hw.passes} {what}")
    ok = bool(verified)
    g, b = median(res["fanin"]), median(res["single"])
    return {
        "link_transport": link,
        "verified": ok,
        "fanin_gbps": round(g, 3) if ok else None,
        "single_gbps": round(b, 3),
        "ratio": round(g / b, 3) if ok else None,
        "fanin_fetch_p50_us": round(median(res["f50"]), 1) if ok else None,
        "fanin_fetch_p99_us": round(median(res["f99"]), 1) if ok else None,
        "fanin_gbps_passes": rounded(res["fanin"]) if ok else None,
        "single_gbps_passes": rounded(res["single"]),
        "fetcher": d.eng.stats()["handoff"],
        "error": None if ok else "destination bytes differ from the source: UNVERIFIED",
    }


async def _decode(
    hw: HandoffWorkload, hosts: list[dict[str, Any]], progress: Callable[[int, str], None]
) -> dict[str, Any]:
    from .. import Engine, LLMRole

    if hw.kind == "latency":
        kv = destination_buffers(hw.as_workload())
    else:  # one region of k blocks per prefill engine
        kv = KVBuffers(hw.tensors, hw.prefills * hw.blocks_per_request, hw.block_bytes, fill=False)
    routers = [await _Router.open(h["router"]) for h in hosts]
    try:
        async with Engine(DECODE_ID, LLMRole.DECODER, _config(hw)) as eng:
            cache = await eng.register_blocks_cache(kv.desc(), kv.addrs, remote_accessible=True)
            endpoints = {
                int(i): (int(cid), (str(addr[0]), int(addr[1])))
                for h in hosts
                for i, (cid, addr) in h["engines"].items()
            }
            d = _Decode(hw, eng, cache, kv, routers, progress, endpoints)
            return await (_latency(d) if hw.kind == "latency" else _fanin(d))
    finally:
        for r in routers:
            r.close()


def decode_main(
    hw: HandoffWorkload,
    hosts: list[dict[str, Any]],
    parent: Connection,
    verbose: bool = False,
) -> None:
    """Process entry (spawn): measure, send ``("result", fields)`` to the parent."""
    logs = LogCapture(verbose)

    def progress(units: int, label: str) -> None:
        parent.send(("progress", units, label))

    try:
        fields = run_loop(_decode(hw, hosts, progress), hw.loop)
    except BenchFailure as exc:
        fields = {"error": str(exc)}
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        detail = logs.why()
        fields = {
            "error": f"{type(exc).__name__}: {exc}" + (f" (dxl log: {detail})" if detail else "")
        }
    parent.send(("result", fields))


# ================================================================== parent side
def units_for(hw: HandoffWorkload) -> int:
    return 1 + 2 * hw.passes


def row_base(hw: HandoffWorkload) -> dict[str, Any]:
    from .. import __version__

    return {
        "mode": "handoff" if hw.kind == "latency" else "fanin",
        "label": hw.label,
        "transport": hw.transport,
        "block_bytes": hw.block_bytes,
        "layers": hw.layers,
        "tensors": hw.tensors,
        "num_blocks": hw.num_blocks,
        "blocks_per_request": hw.blocks_per_request,
        "request_bytes": hw.request_bytes,
        "requests": hw.requests,
        "warmup": hw.warmup,
        "passes": hw.passes,
        "prefills": hw.prefills,
        "prefill_processes": hw.hosts,
        "heartbeat_ms": FANIN_HEARTBEAT_MS if hw.kind == "fanin" else None,
        "transfer_threads": hw.transfer_threads,
        "loop": hw.loop,
        "seed": hw.seed,
        "dxl_version": __version__,
        "cpus": os.cpu_count(),
        "machine": machine_line(),
        "load_1m": round(os.getloadavg()[0], 2),
    }


def run_one(
    hw: HandoffWorkload, progress: Progress, timeout_s: float, verbose: bool = False
) -> dict[str, Any]:
    """Measure one configuration in fresh processes and return its row."""
    ctx = mp.get_context("spawn")
    progress.label(f"{hw.label}: starting")
    procs: list[Any] = []
    pipes: list[Connection] = []
    fields: dict[str, Any] | None = None
    done = 0
    deadline = time.monotonic() + timeout_s
    try:
        for h in range(hw.hosts):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=host_main, args=(hw, h, theirs, verbose), name=f"dxl-prefill-{h}"
            )
            proc.start()
            theirs.close()
            procs.append(proc)
            pipes.append(mine)
        hosts = []
        for conn in pipes:
            if not conn.poll(READY_TIMEOUT_S):
                raise BenchFailure(f"a prefill host did not start within {READY_TIMEOUT_S} s")
            kind, value = conn.recv()
            if kind != "ready":
                raise BenchFailure(str(value))
            hosts.append(value)
        results, theirs = ctx.Pipe(duplex=False)
        decode = ctx.Process(
            target=decode_main, args=(hw, hosts, theirs, verbose), name="dxl-decode"
        )
        decode.start()
        theirs.close()
        procs.append(decode)
        while fields is None:
            fields, units = poll_decode(results, decode, progress, deadline, timeout_s)
            done += units
            for h, conn in enumerate(pipes):  # a host that failed says why
                if fields is None and conn.poll():
                    with contextlib.suppress(EOFError):
                        kind, value = conn.recv()
                        fields = {"error": str(value) if kind == "error" else f"host {h}: {kind}"}
    except (BenchFailure, OSError, EOFError) as exc:
        fields = {"error": str(exc) or type(exc).__name__}
    finally:
        progress.advance(max(0, units_for(hw) - done), hw.label)
        for conn in pipes:
            with contextlib.suppress(OSError):
                conn.send("done")
        clean = fields is not None and not fields.get("error")
        for proc in reversed(procs):
            proc.join(JOIN_TIMEOUT_S if clean else 5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in pipes:
            conn.close()
    row = {**row_base(hw), **fields}
    row.setdefault("verified", False)
    if row.get("error"):
        row["verified"] = False
    return row


def poll_decode(
    results: Connection,
    decode: BaseProcess,
    progress: Progress,
    deadline: float,
    timeout_s: float,
) -> tuple[dict[str, Any] | None, int]:
    """One step of waiting for a bench's decode process (up to 0.5 s): its row's fields once
    it sent them, or an error when it died or ``deadline`` passed (else None), and the progress
    units it reported meanwhile (already passed on to ``progress``)."""
    if results.poll(0.5):
        try:
            msg = results.recv()
        except EOFError:
            return {"error": f"the decode process exited with code {decode.exitcode}"}, 0
        if msg[0] == "progress":
            progress.advance(msg[1], msg[2])
            return None, int(msg[1])
        return msg[1], 0
    if not decode.is_alive():
        decode.join()
        return {"error": f"the decode process exited with code {decode.exitcode}"}, 0
    if time.monotonic() > deadline:
        return {"error": f"timed out after {timeout_s:.0f} s"}, 0
    return None, 0


def run_all(
    todo: list[HandoffWorkload],
    progress: Progress,
    timeout_s: float,
    on_row: Callable[[dict[str, Any]], None],
    verbose: bool = False,
) -> list[dict[str, Any]]:
    rows = []
    for hw in todo:
        row = run_one(hw, progress, timeout_s, verbose)
        rows.append(row)
        on_row(row)
    return rows


def workloads(
    transports: Sequence[str],
    sizes: Sequence[int],
    layers: int,
    latency_shape: Callable[[int], tuple[int, int]],
    requests: int,
    warmup: int,
    passes: int,
    fan_in: int,
    seed: int,
    loop: str,
    threads: int | None,
    debug_corrupt: bool = False,
) -> list[HandoffWorkload]:
    """Per block size and transport: the latency configuration, then fan-in (unless 0).

    ``latency_shape(B)`` gives (blocks per tensor, k) as the plain bench picks them. Fan-in
    offers the same k blocks per prefill engine, cut so that all N offers together stay within
    ``FANIN_MAX_BYTES`` (64 x 64 blocks x 64 tensors x 16 KiB = 4 GiB exactly)."""
    out = []
    for bb in sizes:
        blocks, k = latency_shape(bb)
        for transport in transports:
            base = HandoffWorkload(
                "latency",
                transport,
                bb,
                layers,
                blocks,
                k,
                requests=requests,
                warmup=warmup,
                passes=passes,
                seed=seed,
                loop=loop,
                transfer_threads=threads,
                debug_corrupt=debug_corrupt,
            )
            out.append(base)
            if fan_in:
                row = 2 * layers * bb
                k_fan = max(1, min(k, FANIN_MAX_BYTES // fan_in // row))
                out.append(
                    replace(
                        base,
                        kind="fanin",
                        num_blocks=k_fan,
                        blocks_per_request=k_fan,
                        prefills=fan_in,
                        hosts=max(1, min(fan_in, os.cpu_count() or 1)),
                    )
                )
    return out
