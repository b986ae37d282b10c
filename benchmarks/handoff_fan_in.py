"""Request handoff fan-in: one decode fetching from many prefill engines at once.

Every prefill (a process of its own) offers ``--per-prefill`` handoffs, each of its own blocks
holding a pattern of its own seed; the decode links to every prefill, then starts every fetch
at once, interleaved across prefills (p0 r0, p1 r0, ..., p0 r1, ...), with
``eng.handoff.max_fetches`` capping the fetches in flight (the others wait for a slot,
renewing their leases). It checks, and prints:

* every fetch completes and every block is checksum-verified; each offer ended done exactly
  once on its prefill, and no prefill holds a live offer;
* the cap: ``stats()["handoff"]["fetches_in_flight"]``, sampled as layers land and between,
  never above ``max_fetches`` (and it reached it: the cap did the limiting);
* fair progress: when half of all fetches had completed, the prefill with the fewest completed
  had at least a quarter of the median count (none starved);
* bounded memory: the decode's RSS before the fetches, at its peak, and after.

Scenarios: ``local``, prefills on this host (loopback, cma); ``netns``, prefills on network
namespace "hosts" joined to the decode's namespace by veth pairs, over tcp (root and ``ip``).

    python benchmarks/handoff_fan_in.py --full       # 64 local prefills, then 8 netns hosts
    python benchmarks/handoff_fan_in.py              # 8 local prefills (what CI runs)
    python benchmarks/handoff_fan_in.py --scenario netns --prefills 3

Exit status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# this checkout's dxl (not whichever one the venv installed) first, and its tests' helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peer import Peer

import dxl
from dxl.bench.netns import Star, enter_netns, netns_available
from dxl.handoff import FetchError
from dxl.testing import KVBuffers

FULL = {"local": 64, "netns": 8}
SECRET = "handoff-fan-in"
FAIRNESS = 4  # the slowest prefill has at least median / FAIRNESS done at the half-way point


@dataclass
class Config:
    scenario: str = "local"  # local or netns
    prefills: int = 8  # local: processes; netns: hosts, one prefill each
    per_prefill: int = 6
    blocks: int = 2  # per handoff
    layers: int = 8
    block_bytes: int = 16 << 10
    max_fetches: int = 4
    loop: str = "asyncio"


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def start_prefills(cfg: Config, star: Star | None) -> list[Peer]:
    peers = []
    for i in range(cfg.prefills):
        if star is None:
            peers.append(Peer(200 + i, loop=cfg.loop, wait=False))
        else:
            opts = {
                "llm.listenIpInfo": f"{star.host_ip(i)}:0",
                "dxl.AuthToken": SECRET,
                "dxl.Transport": "tcp",
            }
            peers.append(
                Peer(200 + i, options=opts, netns=star.hosts[i], loop=cfg.loop, wait=False)
            )
    layout = {
        "num_tensors": 2 * cfg.layers,
        "num_blocks": cfg.per_prefill * cfg.blocks,
        "block_bytes": cfg.block_bytes,
    }
    for peer in peers:
        peer.wait_ready(300)
        peer.call("register", name="kv", seed=1, model_id=0, **layout)
    return peers


async def fan_in(cfg: Config, peers: list[Peer], decode_opts: dict[str, str]) -> dict[str, Any]:
    n, r, k = len(peers), cfg.per_prefill, cfg.blocks
    problems: list[str] = []
    buf = KVBuffers(2 * cfg.layers, n * r * k, cfg.block_bytes, fill=False)
    async with dxl.Engine(99, dxl.LLMRole.DECODER, decode_opts) as eng:
        eng.handoff.max_fetches = cfg.max_fetches
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs, remote_accessible=True)
        # the decode's links to its prefills are long-lived: set up first, so that progress
        # measures the fetches (a link set up during the burst delays its prefill's start)
        rss_unlinked = rss_kib()
        t_link = time.monotonic()
        ret, _ = await eng.link_clusters([p.cluster_info() for p in peers], 60_000)
        if ret != dxl.LLMStatusCode.LLM_SUCCESS:
            problems.append(f"link_clusters: {ret.name}")
        link_s = time.monotonic() - t_link
        rss_before = rss_kib()

        async def offers(i: int, peer: Peer) -> list[str]:
            batch = [
                {
                    "request_id": f"p{i}r{j}",
                    "blocks": list(range(j * k, (j + 1) * k)),
                    "seed": seed(i, j),
                }
                for j in range(r)
            ]
            return await peer.aio("offer_many", name="kv", offers=batch)

        tickets = await asyncio.gather(*(offers(i, p) for i, p in enumerate(peers)))
        done: Counter[int] = Counter()
        at_half: list[int] = []
        in_flight = {"max": 0, "samples": 0}
        rss_peak = [rss_before]

        def sample() -> None:
            now = eng.handoff.stats()["fetches_in_flight"]
            in_flight["max"] = max(in_flight["max"], now)
            in_flight["samples"] += 1

        async def one(i: int, j: int) -> None:
            dst = [(j * n + i) * k + b for b in range(k)]
            try:
                await eng.handoff.fetch(tickets[i][j], cache, dst, on_layer=lambda lo, hi: sample())
            except FetchError as exc:
                problems.append(f"fetch p{i}r{j} failed: {exc}")
                return
            tensors = range(buf.num_tensors)
            src = list(range(j * k, (j + 1) * k))
            if not buf.matches(tensors, dst, seed(i, j), tensors, src):
                problems.append(f"p{i}r{j}: fetched blocks fail their checksum")
            done[i] += 1
            if sum(done.values()) == (n * r) // 2:
                at_half.extend(done[p] for p in range(n))

        async def sampler() -> None:
            while True:
                sample()
                rss_peak[0] = max(rss_peak[0], rss_kib())
                await asyncio.sleep(0.002)

        t0 = time.monotonic()
        watcher = asyncio.create_task(sampler())
        await asyncio.gather(*(one(i, j) for j in range(r) for i in range(n)))
        watcher.cancel()
        took = time.monotonic() - t0
        rss_after = rss_kib()
        stats = eng.handoff.stats()

        for i, peer in enumerate(peers):
            ends = await peer.aio("finished")
            reasons = Counter(e["reason"] for e in ends)
            if reasons != Counter({"done": r}) or len({e["offer_id"] for e in ends}) != r:
                problems.append(f"prefill {i} reported {dict(reasons)} for {r} offers")
            if await peer.aio("live"):
                problems.append(f"prefill {i} holds live offers")
        links = len(eng.stats()["links"])
    median = statistics.median(at_half) if at_half else 0
    slowest = min(at_half) if at_half else 0
    if in_flight["max"] > cfg.max_fetches:
        problems.append(f"{in_flight['max']} fetches in flight, over the cap {cfg.max_fetches}")
    if slowest * FAIRNESS < median or slowest == 0:
        problems.append(f"starved: at half-way the slowest prefill had {slowest}, median {median}")
    if stats["fetches_in_flight"] or sum(done.values()) != n * r:
        problems.append(f"{sum(done.values())} of {n * r} fetches completed")
    return {
        "config": asdict(cfg),
        "prefills": n,
        "handoffs": n * r,
        "completed": sum(done.values()),
        "links": links,
        "max_fetches": cfg.max_fetches,
        "max_in_flight": in_flight["max"],
        "in_flight_samples": in_flight["samples"],
        "at_half": {"min": slowest, "median": median, "max": max(at_half, default=0)},
        "renewals": stats["renewals"],
        "rss_mib": {
            "before_links": round(rss_unlinked / 1024, 1),
            "before": round(rss_before / 1024, 1),
            "peak": round(rss_peak[0] / 1024, 1),
            "after": round(rss_after / 1024, 1),
        },
        "seconds": round(took, 2),
        "link_s": round(link_s, 2),
        "problems": problems,
        "ok": not problems,
    }


def seed(i: int, j: int) -> int:
    """The pattern seed of prefill i's handoff j (unique while i < 64 and j < 900)."""
    return 1000 + i * 900 + j


def run(cfg: Config) -> dict[str, Any]:
    """Run one scenario. ``netns`` moves this process into the star's hub namespace: run it in
    a process of its own (the CLI does)."""
    star = None
    if cfg.scenario == "netns":
        why = netns_available()
        if why is not None:
            return {"config": asdict(cfg), "skipped": why, "ok": True, "problems": []}
        star = Star(cfg.prefills).__enter__()
    t0 = time.monotonic()
    peers: list[Peer] = []
    try:
        peers = start_prefills(cfg, star)
        started = time.monotonic() - t0
        if star is None:
            opts = {"llm.listenIpInfo": "127.0.0.1:0"}
        else:  # the decode lives in the hub: every host reaches it through its own cable
            enter_netns(star.hub)
            opts = {
                "llm.listenIpInfo": "0.0.0.0:0",
                "dxl.AuthToken": SECRET,
                "dxl.Transport": "tcp",
            }
        if cfg.loop == "uvloop":
            import uvloop

            out = uvloop.run(fan_in(cfg, peers, opts))
        else:
            out = asyncio.run(fan_in(cfg, peers, opts))
        out["start_prefills_s"] = round(started, 1)
        return out
    finally:
        for peer in peers:
            peer.stop()
        if star is not None:
            star.__exit__()


def print_report(out: dict[str, Any]) -> None:
    cfg = out["config"]
    if "skipped" in out:
        print(f"handoff fan-in {cfg['scenario']}: skipped: {out['skipped']}")
        return
    print(
        f"handoff fan-in {cfg['scenario']}: {out['prefills']} prefills x {cfg['per_prefill']} "
        f"handoffs = {out['handoffs']} ({cfg['blocks']} blocks x {cfg['layers']} layers x "
        f"{cfg['block_bytes'] // 1024} KiB each), {out['links']} links"
    )
    print(f"  completed and verified: {out['completed']} of {out['handoffs']}")
    print(
        f"  fetches in flight: at most {out['max_in_flight']} (cap {out['max_fetches']}, "
        f"{out['in_flight_samples']} samples); lease renewals while waiting: {out['renewals']}"
    )
    half = out["at_half"]
    print(
        f"  progress at half-way, per prefill: min {half['min']}, median {half['median']}, "
        f"max {half['max']}"
    )
    rss = out["rss_mib"]
    print(
        f"  decode RSS: {rss['before_links']} MiB before linking, {rss['before']} before the "
        f"fetches, {rss['peak']} peak, {rss['after']} after"
    )
    print(
        f"  took {out['seconds']} s (linking first {out['link_s']} s, starting the prefills "
        f"{out['start_prefills_s']} s)"
    )
    print("  OK" if out["ok"] else "  PROBLEMS:\n    " + "\n    ".join(out["problems"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="64 local prefills, then 8 netns hosts")
    ap.add_argument("--scenario", choices=("local", "netns"), default="local")
    ap.add_argument("--prefills", type=int, default=Config.prefills)
    ap.add_argument("--per-prefill", type=int, default=Config.per_prefill)
    ap.add_argument("--max-fetches", type=int, default=Config.max_fetches)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.full:  # each scenario in a process of its own (netns moves its process)
        rc = 0
        for scenario, prefills in FULL.items():
            argv2 = ["--scenario", scenario, "--prefills", str(prefills)]
            argv2 += ["--per-prefill", str(args.per_prefill), "--max-fetches", "16"]
            argv2 += ["--loop", args.loop] + (["--json"] if args.json else [])
            rc |= subprocess.run([sys.executable, __file__, *argv2], check=False).returncode
        return rc
    cfg = Config(
        scenario=args.scenario,
        prefills=args.prefills,
        per_prefill=args.per_prefill,
        max_fetches=args.max_fetches,
        loop=args.loop,
    )
    out = run(cfg)
    if args.json:
        print(json.dumps(out))
    else:
        print_report(out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
