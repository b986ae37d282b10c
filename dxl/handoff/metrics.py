"""Handoff metrics of one or more engines: a dict, Prometheus text, and an HTTP endpoint.

Everything comes from :meth:`dxl.handoff.Handoff.stats` of each engine; this module only names
and shapes it. Labels: ``engine`` (the engine's cluster id), ``peer`` (the other engine's
cluster id, or ``none`` for offers nobody claimed), and ``reason``/``status`` where said.
Counters carry per-peer samples only, so ``sum by (engine)`` is the engine's total.

==========================================  =========  ==========================================
metric                                      type       what
==========================================  =========  ==========================================
``dxl_handoff_offers_live``                 gauge      offers not ended yet (engine, peer)
``dxl_handoff_offers_total``                counter    offers made (engine)
``dxl_handoff_offers_ended_total``          counter    offers ended (engine, peer, reason: done,
                                                       failed, aborted, expired)
``dxl_handoff_bytes_sent_total``            counter    bytes this engine wrote into a peer:
                                                       offers served, pushes (engine, peer)
``dxl_handoff_bytes_received_total``        counter    bytes a peer wrote into this engine:
                                                       fetches, pushed layers (engine, peer)
``dxl_handoff_fetches_total``               counter    fetches that succeeded (engine, peer)
``dxl_handoff_fetch_failures_total``        counter    fetches (and pushes) that failed (engine,
                                                       peer)
``dxl_handoff_fetch_errors_total``          counter    the same by status (engine, status)
``dxl_handoff_renewals_sent_total``         counter    lease renewals this engine made (engine,
                                                       peer: the offerer)
``dxl_handoff_renewals_received_total``     counter    renewals of this engine's offers (engine,
                                                       peer: the renewer)
``dxl_handoff_fetches_in_flight``           gauge      fetches running now (engine)
``dxl_handoff_max_fetches``                 gauge      the back-pressure bound (engine)
``dxl_handoff_claims``                      gauge      push-mode claims held (engine)
``dxl_handoff_link_setups``                 gauge      peers a link for a ticket is being set
                                                       up towards (engine)
``dxl_handoff_fetch_seconds``               histogram  fetch() call to return, successful
                                                       fetches (engine, peer: the offerer)
``dxl_handoff_offer_done_seconds``          histogram  offer() to the offer ending done, on the
                                                       offering engine (engine, peer: the
                                                       fetcher or pusher)
==========================================  =========  ==========================================

:func:`as_dict` gives them as plain data (no extra needed). :class:`HandoffCollector` is a
``prometheus_client`` collector, :func:`render` the Prometheus text, and :func:`serve` a tiny
HTTP endpoint (``/metrics``, ``/metrics.json``) on the engines' own event loop; the last three
need the ``metrics`` extra (``pip install dxl[metrics]``). ``import dxl`` never imports
``prometheus_client``; this module imports it only when a function that needs it runs.

Engines' stats are read on their event loop's thread: the collector, when given ``loop``,
hops onto that loop if a scrape comes from another thread (e.g. prometheus_client's own
``start_http_server``); :func:`serve` runs on the loop already.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import httpd

__all__ = ["HandoffCollector", "as_dict", "families", "render", "serve"]

PREFIX = "dxl_handoff"
REASONS = ("done", "failed", "aborted", "expired")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT_S = 5.0
EXTRA_HINT = "Prometheus output needs the metrics extra: pip install 'dxl[metrics]'"


class _HasHandoff(Protocol):
    @property
    def cluster_id(self) -> int: ...

    @property
    def handoff(self) -> Any: ...


Engines = Iterable[_HasHandoff] | Callable[[], Iterable[_HasHandoff]] | _HasHandoff


@dataclass
class Family:
    """One metric: ``samples`` are (label values, value); a histogram's value is a
    :meth:`dxl.handoff.histogram.Histogram.snapshot` dict."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...]
    samples: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)


def _peer(key: Any) -> str:
    return "none" if str(key) == "-1" else str(key)


def stats_of(engines: Engines) -> dict[str, dict[str, Any]]:
    """``{cluster id: engine.handoff.stats()}`` (call on the engines' loop thread)."""
    if hasattr(engines, "handoff"):
        listed: Iterable[_HasHandoff] = [engines]  # type: ignore[list-item]
    elif callable(engines):
        listed = engines()
    else:
        listed = engines
    return {str(e.cluster_id): e.handoff.stats() for e in listed}


def families(stats: dict[str, dict[str, Any]]) -> list[Family]:
    """The metrics of the stats of each engine (``{cluster id: Handoff.stats()}``)."""

    def fam(name: str, kind: str, text: str, *labels: str) -> Family:
        return Family(f"{PREFIX}_{name}", kind, text, ("engine", *labels))

    live = fam("offers_live", "gauge", "Offers not ended yet.", "peer")
    offers = fam("offers_total", "counter", "Offers made.")
    ended = fam("offers_ended_total", "counter", "Offers ended, by reason.", "peer", "reason")
    sent = fam("bytes_sent_total", "counter", "Bytes this engine wrote into the peer.", "peer")
    received = fam(
        "bytes_received_total", "counter", "Bytes the peer wrote into this engine.", "peer"
    )
    fetches = fam("fetches_total", "counter", "Fetches that succeeded.", "peer")
    failures = fam("fetch_failures_total", "counter", "Fetches or pushes that failed.", "peer")
    errors = fam("fetch_errors_total", "counter", "Failed fetches or pushes by status.", "status")
    renew_out = fam("renewals_sent_total", "counter", "Lease renewals this engine made.", "peer")
    renew_in = fam(
        "renewals_received_total", "counter", "Lease renewals of this engine's offers.", "peer"
    )
    in_flight = fam("fetches_in_flight", "gauge", "Fetches running now.")
    max_fetches = fam("max_fetches", "gauge", "Fetches allowed in flight (back-pressure).")
    claims = fam("claims", "gauge", "Push-mode claims held.")
    setups = fam("link_setups", "gauge", "Peers a link for a ticket is being set up towards.")
    fetch_s = fam("fetch_seconds", "histogram", "Successful fetch() calls, call to return.", "peer")
    done_s = fam(
        "offer_done_seconds", "histogram", "Offers that ended done, offer() to the end.", "peer"
    )
    per_peer_counters = (
        (sent, "bytes_sent"),
        (received, "bytes_received"),
        (fetches, "fetched"),
        (failures, "fetch_failed"),
        (renew_out, "renewals_sent"),
        (renew_in, "renewals"),
    )
    for eng, s in stats.items():
        live_by_peer = s.get("live_by_peer") or {}
        live.samples += [((eng, _peer(p)), n) for p, n in live_by_peer.items()]
        if not any(_peer(p) == "none" for p in live_by_peer):
            live.samples.append(((eng, "none"), 0))
        offers.samples.append(((eng,), s["offers"]))
        per_peer: dict[str, dict[str, int]] = {
            _peer(p): c for p, c in (s.get("per_peer") or {}).items()
        }
        for reason in REASONS:
            ended.samples.append(((eng, "none", reason), per_peer.get("none", {}).get(reason, 0)))
            ended.samples += [
                ((eng, p, reason), c[reason])
                for p, c in per_peer.items()
                if p != "none" and reason in c
            ]
        for family, key in per_peer_counters:
            family.samples += [((eng, p), c[key]) for p, c in per_peer.items() if key in c]
        errors.samples += [((eng, code), n) for code, n in s["fetch_failures"].items()]
        in_flight.samples.append(((eng,), s["fetches_in_flight"]))
        max_fetches.samples.append(((eng,), s.get("max_fetches", 0)))
        claims.samples.append(((eng,), s["claims"]))
        setups.samples.append(((eng,), s.get("linking", 0)))
        for p, hists in (s.get("per_peer_hist") or {}).items():
            if "fetch_seconds" in hists:
                fetch_s.samples.append(((eng, _peer(p)), hists["fetch_seconds"]))
            if "done_seconds" in hists:
                done_s.samples.append(((eng, _peer(p)), hists["done_seconds"]))
    return [
        live,
        offers,
        ended,
        sent,
        received,
        fetches,
        failures,
        errors,
        renew_out,
        renew_in,
        in_flight,
        max_fetches,
        claims,
        setups,
        fetch_s,
        done_s,
    ]


def as_dict(engines: Engines) -> dict[str, Any]:
    """Every metric as plain data: ``{name: {"type", "help", "samples": [{"labels": {...},
    "value": number or histogram}]}}`` (call on the engines' loop thread)."""
    return {
        f.name: {
            "type": f.kind,
            "help": f.help,
            "samples": [
                {"labels": dict(zip(f.labels, values, strict=True)), "value": v}
                for values, v in f.samples
            ],
        }
        for f in families(stats_of(engines))
    }


class HandoffCollector:
    """A ``prometheus_client`` collector over engines (an engine, a list, or a function that
    returns the current list): ``REGISTRY.register(HandoffCollector(engine, loop=loop))``.

    ``loop``: the engines' event loop; a scrape from another thread then reads the stats on
    that loop (waiting at most ``timeout_s``). Without it, collect on the loop's thread."""

    def __init__(
        self,
        engines: Engines,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout_s: float = SCRAPE_TIMEOUT_S,
    ) -> None:
        self._engines = engines
        self._loop = loop
        self._timeout_s = timeout_s

    def _stats(self) -> dict[str, dict[str, Any]]:
        loop = self._loop
        if loop is not None:
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:

                async def read() -> dict[str, dict[str, Any]]:
                    return stats_of(self._engines)

                return asyncio.run_coroutine_threadsafe(read(), loop).result(self._timeout_s)
        return stats_of(self._engines)

    def collect(self) -> Iterator[Any]:
        try:
            from prometheus_client.core import (
                CounterMetricFamily,
                GaugeMetricFamily,
                HistogramMetricFamily,
            )
        except ImportError as exc:
            raise ImportError(EXTRA_HINT) from exc
        for f in families(self._stats()):
            labels = list(f.labels)
            if f.kind == "histogram":
                hist = HistogramMetricFamily(f.name, f.help, labels=labels)
                for values, h in f.samples:
                    buckets = [
                        (_le(b), float(c)) for b, c in zip(h["le"], h["cumulative"], strict=True)
                    ]
                    buckets.append(("+Inf", float(h["count"])))
                    hist.add_metric(list(values), buckets, float(h["sum"]))
                yield hist
                continue
            metric: CounterMetricFamily | GaugeMetricFamily
            if f.kind == "counter":
                metric = CounterMetricFamily(f.name, f.help, labels=labels)
            else:
                metric = GaugeMetricFamily(f.name, f.help, labels=labels)
            for values, v in f.samples:
                metric.add_metric(list(values), float(v))
            yield metric


def _le(bound: float) -> str:
    return repr(float(bound))


def render(engines: Engines, *, loop: asyncio.AbstractEventLoop | None = None) -> str:
    """The Prometheus text exposition of the engines' handoff metrics."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest
    except ImportError as exc:
        raise ImportError(EXTRA_HINT) from exc
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HandoffCollector(engines, loop=loop))
    text: bytes = generate_latest(registry)
    return text.decode()


async def serve(
    engines: Engines,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    deadline_s: float = httpd.DEADLINE_S,
    max_connections: int = httpd.MAX_CONNECTIONS,
) -> asyncio.Server:
    """Serve ``GET /metrics`` (Prometheus text) and ``GET /metrics.json`` (:func:`as_dict`)
    over HTTP on the running loop (the engines'); ``server.sockets[0].getsockname()`` has the
    port. Close it with ``server.close()``. ``/metrics`` needs the metrics extra.

    Bounded against strangers (see :mod:`dxl.httpd`): each request must arrive and be answered
    within ``deadline_s`` seconds, at most ``max_connections`` are held at once (one more is
    answered 503), and an oversized request line or header is answered 414 or 431."""
    render(engines)  # fail now, not at the first scrape, without the extra

    def answer(method: str, path: str) -> tuple[int, str, bytes]:
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE, render(engines).encode()
        if path == "/metrics.json":
            return 200, "application/json", json.dumps(as_dict(engines)).encode()
        return 404, "text/plain", b"/metrics or /metrics.json\n"

    return await httpd.start(
        answer, host, port, deadline_s=deadline_s, max_connections=max_connections
    )
