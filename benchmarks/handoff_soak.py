"""Request handoff soak: N handoffs between 1 decode and P prefill engines (separate processes)
with random aborts from either side, random expiries and one prefill SIGKILLed and restarted
mid-run. It checks, and prints:

* every offer ended exactly once on the offering side (``Finished`` records counted per offer)
  and the decode's fetch outcome matches it (returned: done; failed: aborted, expired or
  failed; never fetched: expired). Offers of the killed incarnation that had not ended by the
  last poll before the kill died with it: counted apart, and their fetches must have failed
  (or finished first); the restarted prefill refuses the old tickets;
* no live offer left anywhere at the end (``live() == 0``), no fetch in flight;
* every completed handoff checksum-verified: each request's source blocks hold a pattern of its
  own seed (written just before the offer, into blocks freed by earlier ends), so a copy that
  read blocks after their offer ended would show;
* no write into a free decode block: freed destination blocks get a "free" pattern, checked
  again when they are handed out;
* the decode's fds, threads and RSS after the first wave and at the end (flat).

Each wave offers ``--per-wave`` handoffs on every prefill and fetches them all at once (more
than ``max_fetches``: some wait for a slot, renewing their leases). Per handoff, at random:
fetched (half of them layer by layer), aborted by the decode or by the prefill (by ticket or
request id) as the fetch starts or as layer k lands, or never fetched (a short lease: it
expires).

    python benchmarks/handoff_soak.py --full      # 10,000 handoffs, 16 prefills (full size)
    python benchmarks/handoff_soak.py             # 300 handoffs, 3 prefills (what CI runs)
    python benchmarks/handoff_soak.py --handoffs 2000 --prefills 8 --seed 7 --json

Exit status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from patterns import refill
from peer import Peer, PeerError

import dxl
from dxl.handoff import FetchError, Ticket
from dxl.memory.share import MEMFD_NAME
from dxl.testing import KVBuffers

FULL = {"handoffs": 10_000, "prefills": 16}
FREE_SEED = 7  # the pattern of a free decode block
PEER_ERRORS = (PeerError, EOFError, OSError, TimeoutError)


@dataclass
class Config:
    handoffs: int = 300
    prefills: int = 3
    per_wave: int = 8  # handoffs offered per prefill per wave
    layers: int = 16
    block_bytes: int = 16 << 10
    max_blocks: int = 3  # blocks per handoff: 1..max_blocks
    src_blocks: int = 128  # per prefill
    dst_blocks: int = 512
    max_fetches: int = 64
    abort_rate: float = 0.1  # per side
    expire_rate: float = 0.1
    lease_s: float = 30.0
    short_lease_s: float = 0.3
    kill: bool = True
    seed: int = 1
    loop: str = "asyncio"
    transport: str = "auto"


@dataclass
class Handoff:
    rid: str
    prefill: int
    incarnation: int  # how many times that prefill was restarted before this offer
    src: list[int]
    dst: list[int]
    seed: int
    plan: str  # fetch, decode_abort, prefill_abort, expire, kill
    at_layer: int
    per_layer: bool
    ticket: str = ""
    outcome: str = ""  # done, failed:<status>, never
    ends: list[str] = field(default_factory=list)  # the offering side's Finished reasons
    lost: bool = False  # its prefill was killed before it reported an end


@dataclass
class Prefill:
    index: int
    cluster_id: int
    peer: Peer
    port: int = 0
    incarnation: int = 0
    free: list[int] = field(default_factory=list)
    live: dict[int, Handoff] = field(default_factory=dict)  # offer id -> handoff
    dead: bool = False


def usage() -> dict[str, Any]:
    """This process's open fds (and how many of each kind: socket, pipe, ...), threads, RSS and
    its private part (KiB: RSS less the resident pages of shared mappings, which include the
    prefills' memory mapped from their memfds and grow as more of it is read: not a leak), and
    its mappings, garbage collected first (what is unreachable is no leak)."""
    gc.collect()
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    with open("/proc/self/statm") as f:
        statm = [int(x) for x in f.read().split()]
    rss_kib, private_kib = statm[1] * page_kib, (statm[1] - statm[2]) * page_kib
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    kinds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            kinds[_fd_kind(os.readlink(f"/proc/self/fd/{fd}"))] += 1
    return {
        "fds": sum(kinds.values()),
        "fd_kinds": dict(sorted(kinds.items())),
        "threads": threading.active_count(),
        "os_threads": len(os.listdir("/proc/self/task")),
        "rss_kib": rss_kib,
        "private_kib": private_kib,
        "maps": maps,
    }


SHARED_MEMORY = "shared memory"  # our memfds, and the peers' (each peer window's mmap holds one)


def _fd_kind(target: str) -> str:
    """socket, pipe, anon_inode:[eventfd], ..., shared memory (dxl's memfds) or file."""
    if target.startswith(MEMFD_NAME):
        return SHARED_MEMORY
    if target.startswith("/"):
        return "file"
    kind = target.partition(":")[0]
    return target if kind == "anon_inode" else kind


class Soak:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.handoffs: list[Handoff] = []
        self.prefills: list[Prefill] = []
        self.problems: list[str] = []
        self.seeds = iter(range(1000, 1 << 16))
        self.layout = {
            "num_tensors": 2 * cfg.layers,
            "num_blocks": cfg.src_blocks,
            "block_bytes": cfg.block_bytes,
        }
        self.opts = {"dxl.Transport": cfg.transport}
        self.usage: dict[str, dict[str, Any]] = {}
        self.windows_at_end: dict[int, int] = {}
        self.kill_wave = -1
        self.old_ticket_refused: bool | None = None

    def problem(self, what: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(what)

    # ------------------------------------------------------------------ prefills
    def start_prefills(self) -> None:
        peers = [
            Peer(100 + i, options=self.opts, loop=self.cfg.loop, wait=False)
            for i in range(self.cfg.prefills)
        ]
        for i, peer in enumerate(peers):
            peer.wait_ready(120)
            peer.call("register", name="kv", seed=1, model_id=0, **self.layout)
            self.prefills.append(
                Prefill(
                    i, peer.cluster_id, peer, peer.address[1], 0, list(range(self.cfg.src_blocks))
                )
            )

    def restart(self, p: Prefill) -> None:
        """The killed prefill comes back: same cluster id, same address, a new incarnation."""
        p.peer.proc.join(10)
        opts = {**self.opts, "llm.listenIpInfo": f"127.0.0.1:{p.port}"}
        p.peer.stop()
        p.peer.proc.close()  # its sentinel pipe goes now, not when the object is collected
        p.peer = Peer(p.cluster_id, options=opts, loop=self.cfg.loop)
        p.peer.call("register", name="kv", seed=1, model_id=0, **self.layout)
        p.incarnation += 1
        p.free = list(range(self.cfg.src_blocks))
        for h in p.live.values():
            h.lost = True
        p.live.clear()
        p.dead = False

    async def poll(self, p: Prefill) -> None:
        """Collect the prefill's ends; an ended offer's source blocks are free again."""
        if p.dead:
            return
        for r in await p.peer.aio("finished"):
            h = p.live.pop(r["offer_id"], None)
            if h is None:
                self.problem(f"prefill {p.index}: an end of unknown offer {r}")
                continue
            h.ends.append(r["reason"])
            h.ticket = ""  # ended: the run keeps only what it reports
            p.free.extend(h.src)

    # ------------------------------------------------------------------ one wave
    def plan(self, p: Prefill, n: int, kill: bool) -> list[Handoff]:
        cfg, rng = self.cfg, self.rng
        out = []
        for _ in range(n):
            k = rng.randint(1, cfg.max_blocks)
            if len(p.free) < k:
                break
            rng.shuffle(p.free)
            src = [p.free.pop() for _ in range(k)]
            x = rng.random()
            plan = (
                "expire"
                if x < cfg.expire_rate
                else "decode_abort"
                if x < cfg.expire_rate + cfg.abort_rate
                else "prefill_abort"
                if x < cfg.expire_rate + 2 * cfg.abort_rate
                else "fetch"
            )
            if kill and plan == "fetch":
                plan, kill = "kill", False
            h = Handoff(
                rid=f"p{p.index}.{p.incarnation}.{len(self.handoffs)}",
                prefill=p.index,
                incarnation=p.incarnation,
                src=src,
                dst=[],
                seed=next(self.seeds),
                plan=plan,
                # -1: as the fetch starts; else as that layer lands
                at_layer=0 if plan == "kill" else rng.randrange(-cfg.layers // 2, cfg.layers),
                per_layer=plan != "fetch" or rng.random() < 0.5,
            )
            self.handoffs.append(h)
            out.append(h)
        return out

    async def offer(self, p: Prefill, batch: list[Handoff]) -> None:
        offers = [
            {
                "request_id": h.rid,
                "blocks": h.src,
                "seed": h.seed,
                "lease_s": self.cfg.short_lease_s if h.plan == "expire" else self.cfg.lease_s,
            }
            for h in batch
        ]
        for h, ticket in zip(
            batch, await p.peer.aio("offer_many", name="kv", offers=offers), strict=True
        ):
            h.ticket = ticket
            p.live[Ticket.of(ticket).offer_id] = h

    async def fetch(self, d: Any, h: Handoff, side_tasks: list[asyncio.Task[Any]]) -> None:
        p = self.prefills[h.prefill]
        buf: KVBuffers = d["buf"]

        def act() -> None:
            if h.plan == "decode_abort":
                side_tasks.append(asyncio.create_task(d["eng"].handoff.abort(h.ticket)))
            elif h.plan == "prefill_abort":
                target = h.ticket if self.rng.random() < 0.5 else h.rid
                side_tasks.append(asyncio.create_task(p.peer.aio("abort", ticket=target)))
            elif h.plan == "kill" and not p.dead:
                p.dead = True
                os.kill(p.peer.proc.pid, signal.SIGKILL)

        def on_layer(lo: int, hi: int) -> None:
            if lo == h.at_layer:
                act()

        task = asyncio.create_task(
            d["eng"].handoff.fetch(
                h.ticket, d["cache"], h.dst, on_layer=on_layer if h.per_layer else None
            )
        )
        if h.at_layer < 0:  # as the fetch starts
            act()
        try:
            await task
            h.outcome = "done"
            tensors = range(buf.num_tensors)
            if not buf.matches(tensors, h.dst, h.seed, tensors, h.src):
                self.problem(f"{h.rid}: fetched blocks fail their checksum")
        except FetchError as exc:
            h.outcome = f"failed:{exc.status_code.name}"
        refill(buf, h.dst, FREE_SEED)  # the fetch returned: nothing writes these any more
        d["free"].extend(h.dst)

    def take_dst(self, d: Any, k: int) -> list[int]:
        free: list[int] = d["free"]
        self.rng.shuffle(free)
        dst = [free.pop() for _ in range(k)]
        buf: KVBuffers = d["buf"]
        tensors = range(buf.num_tensors)
        if not buf.matches(tensors, dst, FREE_SEED, tensors, dst):
            self.problem(f"free decode blocks {dst} were written while free")
        return dst

    async def wave(self, d: Any, number: int, count: int) -> None:
        live = [p for p in self.prefills if not p.dead]
        kill = number == self.kill_wave
        batches = []
        for i, p in enumerate(live):
            n = min(self.cfg.per_wave, count - sum(len(b) for b in batches))
            batches.append(self.plan(p, n, kill and i == 0))
        await asyncio.gather(*(self.offer(p, b) for p, b in zip(live, batches, strict=True)))
        side_tasks: list[asyncio.Task[Any]] = []
        fetches = []
        for round_ in range(max(map(len, batches), default=0)):  # interleaved across prefills
            for batch in batches:
                if round_ < len(batch) and batch[round_].plan != "expire":
                    h = batch[round_]
                    h.dst = self.take_dst(d, len(h.src))
                    fetches.append(self.fetch(d, h, side_tasks))
        for batch in batches:
            for h in batch:
                if h.plan == "expire":
                    h.outcome = "never"
        await asyncio.gather(*fetches)
        for result in await asyncio.gather(*side_tasks, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, PEER_ERRORS):
                self.problem(f"an abort raised {result!r}")
            elif isinstance(result, PeerError):  # a live prefill must take any abort
                self.problem(f"a prefill's abort raised {result}")
        for p in live:
            if not p.dead:
                await self.poll(p)
        if kill:
            await self.after_kill(d, self.prefills[0])

    async def after_kill(self, d: Any, p: Prefill) -> None:
        old = [h for h in p.live.values()]
        self.restart(p)
        if await p.peer.aio("live") != 0:
            self.problem("the restarted prefill has live offers")
        # an old ticket is refused by the new incarnation, and nothing moves
        if old:
            dst = self.take_dst(d, len(old[0].src))
            try:
                await d["eng"].handoff.fetch(old[0].ticket, d["cache"], dst)
                self.old_ticket_refused = False
            except FetchError:
                self.old_ticket_refused = True
            buf: KVBuffers = d["buf"]
            tensors = range(buf.num_tensors)
            if not buf.matches(tensors, dst, FREE_SEED, tensors, dst):
                self.problem("a refused old ticket wrote into the decode")
            d["free"].extend(dst)

    # ------------------------------------------------------------------ the run
    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.monotonic()
        self.start_prefills()
        started = time.monotonic() - t0
        buf = KVBuffers(2 * cfg.layers, cfg.dst_blocks, cfg.block_bytes, seed=FREE_SEED)
        opts = {"llm.listenIpInfo": "127.0.0.1:0", "dxl.Transport": cfg.transport}
        async with dxl.Engine(99, dxl.LLMRole.DECODER, opts) as eng:
            eng.handoff.max_fetches = cfg.max_fetches
            cache = await eng.register_blocks_cache(buf.desc(), buf.addrs, remote_accessible=True)
            self.usage["registered"] = usage()
            d = {"eng": eng, "buf": buf, "cache": cache, "free": list(range(cfg.dst_blocks))}
            per_wave = cfg.per_wave * cfg.prefills
            waves = -(-cfg.handoffs // per_wave)
            self.kill_wave = waves // 2 if cfg.kill and waves > 2 else -1
            issued = 0
            for number in range(waves):
                await self.wave(d, number, min(per_wave, cfg.handoffs - issued))
                issued = len(self.handoffs)
                if number == 0:
                    self.usage["after the first wave"] = usage()
            # the never-fetched offers expire; every prefill ends up with nothing live
            deadline = time.monotonic() + 30
            while any(p.live for p in self.prefills) and time.monotonic() < deadline:
                for p in self.prefills:
                    await self.poll(p)
                await asyncio.sleep(0.05)
            lives = [await p.peer.aio("live") for p in self.prefills]
            engine_stats = eng.stats()
            stats = engine_stats["handoff"]
            self.usage["at the end"] = usage()
            self.windows_at_end = {
                cid: link["shared_windows"] for cid, link in engine_stats["links"].items()
            }
        for p in self.prefills:
            p.peer.stop()
        return self.report(lives, stats, started, time.monotonic() - t0)

    def report(
        self, lives: list[int], stats: dict[str, Any], started: float, took: float
    ) -> dict[str, Any]:
        outcomes: Counter[str] = Counter()
        for h in self.handoffs:
            reason = h.ends[0] if len(h.ends) == 1 else f"{len(h.ends)} ends"
            if h.lost:
                reason = "lost with the killed prefill"
                if h.ends:
                    self.problem(f"{h.rid}: lost, yet reported {h.ends}")
                if h.outcome == "done":
                    outcomes["lost, fetched before the kill"] += 1
            elif len(h.ends) != 1:
                self.problem(f"{h.rid} ({h.plan}) ended {len(h.ends)} times: {h.ends}")
            else:
                expect = {
                    "done": {"done"},
                    "never": {"expired"},
                }.get(h.outcome, {"aborted", "expired", "failed"})
                if h.ends[0] not in expect:
                    self.problem(f"{h.rid} ({h.plan}): fetch {h.outcome} but the offer {h.ends[0]}")
            outcomes[f"{h.plan}: {h.outcome.split(':')[0]} / {reason}"] += 1
        if any(lives):
            self.problem(f"offers still live on the prefills: {lives}")
        if stats["fetches_in_flight"] or stats["offers_live"]:
            self.problem(f"the decode holds fetches or offers: {stats}")
        done = sum(h.outcome == "done" for h in self.handoffs)
        if stats["fetch"]["ops"] != done:
            self.problem(f"the decode counted {stats['fetch']['ops']} fetches, {done} returned")
        if self.kill_wave >= 0 and self.old_ticket_refused is False:
            self.problem("the restarted prefill served a ticket of its old incarnation")
        return {
            "config": self.cfg.__dict__,
            "handoffs": len(self.handoffs),
            "verified": done,
            "outcomes": dict(sorted(outcomes.items())),
            "lost_with_killed_prefill": sum(h.lost for h in self.handoffs),
            "old_ticket_refused": self.old_ticket_refused,
            "live_at_end": lives,
            "decode_handoff_stats": {
                k: stats[k] for k in ("fetch_failures", "renewals", "fetches_in_flight")
            },
            "decode_usage": self.usage,
            "windows_at_end": self.windows_at_end,  # per linked prefill: its windows mapped here
            "prefill_ids": [p.cluster_id for p in self.prefills],
            "seconds": {"start_prefills": round(started, 1), "total": round(took, 1)},
            "problems": self.problems,
            "ok": not self.problems,
        }


def run(cfg: Config) -> dict[str, Any]:
    if cfg.loop == "uvloop":
        import uvloop

        return uvloop.run(Soak(cfg).run())
    return asyncio.run(Soak(cfg).run())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="10,000 handoffs, 16 prefills")
    ap.add_argument("--handoffs", type=int, default=Config.handoffs)
    ap.add_argument("--prefills", type=int, default=Config.prefills)
    ap.add_argument("--per-wave", type=int, default=Config.per_wave)
    ap.add_argument("--max-fetches", type=int, default=Config.max_fetches)
    ap.add_argument("--seed", type=int, default=Config.seed)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--transport", choices=("auto", "cma", "tcp"), default="auto")
    ap.add_argument("--no-kill", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = Config(
        handoffs=args.handoffs,
        prefills=args.prefills,
        per_wave=args.per_wave,
        max_fetches=args.max_fetches,
        seed=args.seed,
        loop=args.loop,
        transport=args.transport,
        kill=not args.no_kill,
    )
    if args.full:
        cfg.handoffs, cfg.prefills = FULL["handoffs"], FULL["prefills"]
    out = run(cfg)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print_report(out)
    return 0 if out["ok"] else 1


def print_report(out: dict[str, Any]) -> None:
    cfg = out["config"]
    print(
        f"handoff soak: {out['handoffs']} handoffs, {cfg['prefills']} prefills, seed {cfg['seed']}"
    )
    for what, n in out["outcomes"].items():
        print(f"  {n:6d}  {what}")
    print(f"  verified: {out['verified']} fetched handoffs, every block checksummed")
    print(
        f"  killed prefill: {out['lost_with_killed_prefill']} offers lost with it; "
        f"old ticket refused: {out['old_ticket_refused']}"
    )
    print(f"  live offers at the end: {out['live_at_end']}")
    for when, u in out["decode_usage"].items():
        print(
            f"  decode {when}: fds {u['fds']}, threads {u['threads']} (os {u['os_threads']}), "
            f"RSS {u['rss_kib'] / 1024:.1f} MiB"
        )
    secs = out["seconds"]
    print(f"  took {secs['total']} s (starting the prefills {secs['start_prefills']} s)")
    print("  OK" if out["ok"] else "  PROBLEMS:\n    " + "\n    ".join(out["problems"]))


if __name__ == "__main__":
    sys.exit(main())
