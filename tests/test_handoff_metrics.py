"""Handoff metrics (dxl/handoff/metrics.py): the dict, the Prometheus text (metrics extra), the
HTTP endpoint, scrapes from another thread, and that ``import dxl`` stays free of
prometheus_client.

Two engines on the test's loop hand off a known mix: two fetches (one renewed first), one
offer left to expire, one aborted by its offerer, one push-mode offer pushed into and
completed; every number checked below follows from that mix.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

import dxl
from dxl.handoff import Ended, metrics
from dxl.testing import KVBuffers

P_ID, D_ID = 11, 12
TENSORS, BLOCKS, BB = 4, 16, 4096
SEED = 9


@dataclass
class Pair:
    prefill: dxl.Engine
    decode: dxl.Engine
    pcache: Any
    dcache: Any
    dkv: KVBuffers


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    pkv = KVBuffers(TENSORS, BLOCKS, BB, seed=SEED)
    dkv = KVBuffers(TENSORS, BLOCKS, BB, fill=False)
    cfgs = []
    for _ in range(2):
        cfg = dxl.LLMConfig()
        cfg.listen_ip_info = "127.0.0.1:0"
        cfgs.append(cfg)
    async with (
        dxl.Engine(P_ID, dxl.LLMRole.PROMPT, cfgs[0]) as prefill,
        dxl.Engine(D_ID, dxl.LLMRole.DECODER, cfgs[1]) as decode,
    ):
        pcache = await prefill.register_blocks_cache(
            pkv.desc(), pkv.addrs, dxl.BlocksCacheKey(P_ID, 0), remote_accessible=True
        )
        dcache = await decode.register_blocks_cache(dkv.desc(), dkv.addrs, remote_accessible=True)
        yield Pair(prefill, decode, pcache, dcache, dkv)


async def _ends(eng: dxl.Engine, n: int) -> dict[str, Ended]:
    out: dict[str, Ended] = {}
    async with asyncio.timeout(30):
        async for f in eng.handoff.finished():
            out[f.request_id] = f.reason
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


async def _mix(p: Pair) -> None:
    """2 fetches of 2 and 3 blocks (the second renewed first), 1 expiry, 1 abort, 1 push."""
    h = p.prefill.handoff
    t1 = await h.offer("fetched-1", p.pcache, [1, 2])
    await p.decode.handoff.fetch(t1.to_json(), p.dcache, [3, 4])
    t2 = await h.offer("fetched-2", p.pcache, [5, 6, 7])
    await p.decode.handoff.renew(t2.to_json())
    await p.decode.handoff.fetch(t2.to_dict(), p.dcache, [8, 9, 10])
    await h.offer("expires", p.pcache, [1], lease_s=0.05)
    await h.offer("aborted", p.pcache, [2])
    await h.abort("aborted")
    assert await _ends(p.prefill, 4) == {
        "fetched-1": Ended.DONE,
        "fetched-2": Ended.DONE,
        "expires": Ended.EXPIRED,
        "aborted": Ended.ABORTED,
    }
    t3 = await p.decode.handoff.offer_destination("pushed", p.dcache, [12])
    await h.push(t3, p.pcache, [0])
    await h.complete(t3)
    assert await _ends(p.decode, 1) == {"pushed": Ended.DONE}
    rows = range(TENSORS)
    assert p.dkv.matches(rows, [3, 4, 8, 9, 10, 12], SEED, rows, [1, 2, 5, 6, 7, 0])


def _value(d: dict[str, Any], name: str, **labels: str) -> Any:
    found = [s["value"] for s in d[name]["samples"] if s["labels"] == labels]
    assert len(found) == 1, (name, labels, d[name]["samples"])
    return found[0]


async def test_the_dict_counts_every_end_byte_renewal_and_latency(pair: Pair) -> None:
    await _mix(pair)
    d = metrics.as_dict([pair.prefill, pair.decode])
    p, dc, none = str(P_ID), str(D_ID), "none"
    moved = 5 * TENSORS * BB  # fetched: 2 + 3 blocks of every tensor
    pushed = 1 * TENSORS * BB
    # the prefill's offers: each ended once; unclaimed ends have no peer
    assert _value(d, "dxl_handoff_offers_total", engine=p) == 4
    ended = {
        (s["labels"]["peer"], s["labels"]["reason"]): s["value"]
        for s in d["dxl_handoff_offers_ended_total"]["samples"]
        if s["labels"]["engine"] == p and s["value"]
    }
    assert ended == {(dc, "done"): 2, (none, "expired"): 1, (none, "aborted"): 1}
    assert _value(d, "dxl_handoff_offers_ended_total", engine=dc, peer=p, reason="done") == 1
    assert _value(d, "dxl_handoff_offers_live", engine=p, peer=none) == 0
    # bytes both ways, push mode included, and both sides agree
    assert _value(d, "dxl_handoff_bytes_sent_total", engine=p, peer=dc) == moved + pushed
    assert _value(d, "dxl_handoff_bytes_received_total", engine=dc, peer=p) == moved + pushed
    assert _value(d, "dxl_handoff_fetches_total", engine=dc, peer=p) == 2
    assert d["dxl_handoff_fetch_failures_total"]["samples"] == []
    assert _value(d, "dxl_handoff_renewals_sent_total", engine=dc, peer=p) == 1
    assert _value(d, "dxl_handoff_renewals_received_total", engine=p, peer=dc) == 1
    assert _value(d, "dxl_handoff_fetches_in_flight", engine=dc) == 0
    assert _value(d, "dxl_handoff_link_setups", engine=dc) == 0  # linked: none running
    assert _value(d, "dxl_handoff_max_fetches", engine=dc) == pair.decode.handoff.max_fetches
    # histograms: cumulative, as many observations as fetches / done offers
    fetch_h = _value(d, "dxl_handoff_fetch_seconds", engine=dc, peer=p)
    assert fetch_h["count"] == 2 and fetch_h["sum"] > 0
    assert fetch_h["cumulative"] == sorted(fetch_h["cumulative"])
    assert fetch_h["cumulative"][-1] <= 2
    done_h = _value(d, "dxl_handoff_offer_done_seconds", engine=p, peer=dc)
    assert done_h["count"] == 2
    assert _value(d, "dxl_handoff_offer_done_seconds", engine=dc, peer=p)["count"] == 1
    # the same numbers as stats(), which engine.stats() carries too
    stats = pair.prefill.stats()["handoff"]
    assert stats["bytes_sent"] == moved + pushed and stats["renewals_received"] == 1
    assert stats["per_peer"][D_ID]["bytes_sent"] == moved + pushed
    assert stats["per_peer_hist"][D_ID]["done_seconds"]["count"] == 2
    assert pair.decode.stats()["handoff"]["bytes_received"] == moved + pushed
    json.dumps(d)  # plain data


async def test_a_fresh_engine_has_every_series_at_zero(pair: Pair) -> None:
    d = metrics.as_dict(lambda: [pair.prefill])  # a function that lists the engines
    assert set(d) == {f.name for f in metrics.families({})}
    e = str(P_ID)
    assert _value(d, "dxl_handoff_offers_total", engine=e) == 0
    for reason in ("done", "failed", "aborted", "expired"):
        assert (
            _value(d, "dxl_handoff_offers_ended_total", engine=e, peer="none", reason=reason) == 0
        )
    assert _value(d, "dxl_handoff_offers_live", engine=e, peer="none") == 0
    assert metrics.as_dict(pair.prefill) == d  # one engine alone works as well


def _prometheus() -> Any:
    return pytest.importorskip(
        "prometheus_client",
        reason="the Prometheus output needs the metrics extra (pip install 'dxl[metrics]'); "
        "the dev extra installs it",
    )


def _parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


async def test_prometheus_text_matches_the_dict(pair: Pair) -> None:
    _prometheus()
    await _mix(pair)
    text = metrics.render([pair.prefill, pair.decode])
    assert "# TYPE dxl_handoff_offers_ended_total counter" in text
    assert "# TYPE dxl_handoff_fetch_seconds histogram" in text
    samples = _parse(text)
    d = metrics.as_dict([pair.prefill, pair.decode])
    for name, fam in d.items():
        for s in fam["samples"]:
            labels = tuple(sorted(s["labels"].items()))
            if fam["type"] == "histogram":
                h = s["value"]
                assert samples[(f"{name}_count", labels)] == h["count"]
                assert samples[(f"{name}_sum", labels)] == pytest.approx(h["sum"])
                for le, c in zip(h["le"], h["cumulative"], strict=True):
                    key = tuple(sorted((*labels, ("le", repr(float(le))))))
                    assert samples[(f"{name}_bucket", key)] == c
                inf = tuple(sorted((*labels, ("le", "+Inf"))))
                assert samples[(f"{name}_bucket", inf)] == h["count"]
            else:
                assert samples[(name, labels)] == s["value"], (name, labels)


async def test_scrape_from_another_thread_reads_on_the_loop(pair: Pair) -> None:
    """prometheus_client's own HTTP server scrapes from its thread: the collector hops onto
    the engines' loop instead of reading their state from another thread."""
    _prometheus()
    await _mix(pair)
    loop = asyncio.get_running_loop()
    text = await asyncio.to_thread(metrics.render, [pair.prefill, pair.decode], loop=loop)
    key = ("dxl_handoff_fetches_total", (("engine", str(D_ID)), ("peer", str(P_ID))))
    assert _parse(text)[key] == 2


async def _get(port: int, path: str, method: str = "GET") -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.decode(), body.decode()


async def test_http_endpoint_serves_text_and_json(pair: Pair) -> None:
    _prometheus()
    await _mix(pair)
    server = await metrics.serve([pair.prefill, pair.decode])
    port = server.sockets[0].getsockname()[1]
    try:
        head, body = await _get(port, "/metrics")
        assert head.startswith("HTTP/1.1 200") and "text/plain; version=0.0.4" in head
        assert body == metrics.render([pair.prefill, pair.decode])
        head, body = await _get(port, "/metrics.json?x=1")
        assert head.startswith("HTTP/1.1 200") and "application/json" in head
        assert json.loads(body) == json.loads(
            json.dumps(metrics.as_dict([pair.prefill, pair.decode]))
        )
        assert (await _get(port, "/nope"))[0].startswith("HTTP/1.1 404")
        assert (await _get(port, "/metrics", "POST"))[0].startswith("HTTP/1.1 405")
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.multiproc
def test_import_dxl_does_not_import_prometheus_client() -> None:
    code = (
        "import sys, dxl, dxl.handoff, dxl.handoff.metrics, dxl.bench.cli; "
        "assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_without_the_extra_the_text_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"dxl\[metrics\]"):
        metrics.render([])
