"""The initiator process: links to the target, runs the passes, verifies, reports one row.

Per pass (passes alternate the order, so noise hits dxl and the baselines alike):

- dxl: clear the destination, ``warmup`` requests, then ``requests`` timed requests, then
  verify every block the pass wrote (pull: here; push: the target checks and answers). Before
  the first pass one request from a clean destination is verified strictly: its blocks hold
  the source's bytes and every other block is untouched.
- memcpy: the same piece lists copied between two local caches by one thread, and by as many
  threads as dxl's copy uses (the limit of cma rows).
- raw socket: the same bytes per request over one TCP stream (loopback, or the veth of
  ``--netns``), and over as many
  streams as the tcp transport opens for a request of that size (the limit of tcp rows; both
  when the link is tcp, or with ``--baselines all``).

Messages to the parent (pipe): ``("progress", units, label)`` and finally ``("result", row)``.
"""

from __future__ import annotations

import contextlib
import resource
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from ..testing import KVBuffers
from ..transport.names import TCP
from .baselines import (
    RawSocketClient,
    copy_threads,
    memcpy_requests,
    plan_requests,
    tcp_streams,
)
from .control import Destination, TargetControl
from .engines import LogCapture
from .measure import (
    BenchFailure,
    Driver,
    check_transport,
    make_driver,
    median,
    percentiles_us,
    rounded,
)
from .netns import enter_netns
from .rows import failed_row, row_base
from .workload import (
    Workload,
    destination_buffers,
    pass_tables,
    source_buffers,
    thp_mib,
)

PROBE_PASS = 1 << 20  # rng stream of the strict first request, apart from every pass's


class _Passes:
    """One configuration's passes: dxl and the baselines over the same request tables."""

    def __init__(
        self,
        w: Workload,
        driver: Driver,
        dest: Destination,
        memcpy_pair: tuple[KVBuffers, KVBuffers],
        sock: RawSocketClient | None,
        streams: RawSocketClient | None,
        progress: Callable[[int, str], None],
        cpu: Callable[[], float],
    ) -> None:
        self.w = w
        self.driver = driver
        self.dest = dest
        self.mdst, self.msrc = memcpy_pair
        self.sock = sock
        self.streams = streams  # None: one stream is as many as the transport opens
        self.threads = copy_threads(w.transfer_threads)
        self._match = "memcpy"  # the row's limit; set_link names it once the link is known
        self.progress = progress
        self.cpu = cpu  # CPU seconds used so far by both processes, every thread
        self.nbytes = w.requests * w.request_bytes  # timed bytes per pass
        # CPU ms per GB moved over the timed requests, both processes: dxl and its limit. What
        # a loaded machine cannot skew: a share of the CPUs changes the GB/s, not the cost
        self.cpu_ms_per_gb: dict[str, list[float]] = {"dxl": [], "limit": []}
        self.gbps: list[float] = []
        self.p50s: list[float] = []
        self.p99s: list[float] = []
        self.base: dict[str, list[float]] = {
            "memcpy": [],
            "raw_socket": [],
            "memcpy_limit": [],
            "raw_socket_limit": [],
        }

    def set_link(self, link: str) -> None:
        self._match = "raw_socket" if link == TCP else "memcpy"

    def probe(self) -> bool:
        """One request into a clean destination: its blocks arrive, nothing else changes."""
        w = self.w
        self.progress(1, f"{w.label}: probe")
        (blocks,) = pass_tables(w.seed, PROBE_PASS, w.num_blocks, w.blocks_per_request, 1)
        self.dest.clear()
        self.driver.batch([blocks.tolist()], 1)
        return self.dest.verify(blocks, strict=True)

    def dxl(self, p: int, tables: list[np.ndarray]) -> bool:
        """Timed dxl requests of pass ``p``; True if every block they wrote verifies."""
        w = self.w
        self.progress(0, f"{w.label}: pass {p + 1}/{w.passes} dxl")
        ids = [t.tolist() for t in tables]
        self.dest.clear()
        self.driver.batch(ids[: w.warmup], w.concurrency)
        cpu0 = self.cpu()
        wall, lat = self.driver.batch(ids[w.warmup :], w.concurrency)
        self._cost("dxl", cpu0)
        if w.debug_corrupt:
            self.dest.corrupt(int(tables[-1][0]))
        ok = self.dest.verify(np.concatenate(tables))
        self.gbps.append(self.nbytes / wall / 1e9)
        p50, p99 = percentiles_us(lat)
        self.p50s.append(p50)
        self.p99s.append(p99)
        self.progress(1, f"{w.label}: pass {p + 1}/{w.passes} dxl")
        return ok

    def baselines(self, p: int, tables: list[np.ndarray]) -> None:
        """The same requests as memcpy with one thread and with dxl's threads, and over the raw
        socket with one stream and with the transport's streams when it is open. With one
        thread (stream) to dxl, the one-thread (one-stream) figure is the limit too."""
        w = self.w
        self.progress(0, f"{w.label}: pass {p + 1}/{w.passes} baselines")
        plans = plan_requests(self.mdst.addrs, self.msrc.addrs, tables, w.block_bytes)
        memcpy_requests(plans[: w.warmup])
        wall, _ = memcpy_requests(plans[w.warmup :])
        one = self.nbytes / wall / 1e9
        self.base["memcpy"].append(one)
        if self.threads > 1:
            memcpy_requests(plans[: w.warmup], self.threads)
            cpu0 = self.cpu()
            wall, _ = memcpy_requests(plans[w.warmup :], self.threads)
            self._cost("memcpy_limit", cpu0)
            self.base["memcpy_limit"].append(self.nbytes / wall / 1e9)
        else:
            self.base["memcpy_limit"].append(one)
        if self.sock is not None:
            self.sock.requests(w.op, w.request_bytes, w.warmup)
            wall, _ = self.sock.requests(w.op, w.request_bytes, w.requests)
            one = self.nbytes / wall / 1e9
            self.base["raw_socket"].append(one)
            if self.streams is not None:
                self.streams.requests(w.op, w.request_bytes, w.warmup)
                cpu0 = self.cpu()
                wall, _ = self.streams.requests(w.op, w.request_bytes, w.requests)
                self._cost("raw_socket_limit", cpu0)
                self.base["raw_socket_limit"].append(self.nbytes / wall / 1e9)
            else:
                self.base["raw_socket_limit"].append(one)
        self.progress(1, f"{w.label}: pass {p + 1}/{w.passes} baselines")

    def _cost(self, what: str, cpu0: float) -> None:
        """Record the CPU ms per GB of the timed requests just run (``dxl`` or a limit)."""
        ms = (self.cpu() - cpu0) * 1e3 / (self.nbytes / 1e9)
        if what == "dxl":
            self.cpu_ms_per_gb["dxl"].append(ms)
        elif what == f"{self._match}_limit":
            self.cpu_ms_per_gb["limit"].append(ms)

    def _streams(self) -> int:
        return self.streams.streams if self.streams is not None else 1

    def row(self, link: str, verified: bool, thp: dict[str, float]) -> dict[str, Any]:
        """The configuration's row: medians over passes; no dxl number unless verified."""
        match = "raw_socket" if link == TCP else "memcpy"
        g, b = median(self.gbps), median(self.base[match])
        limit = median(self.base[f"{match}_limit"])
        parallel = self._streams() if match == "raw_socket" else self.threads
        ok = bool(verified)
        cpu = self.cpu_ms_per_gb
        return {
            **row_base(self.w),
            "link_transport": link,
            "gbps": round(g, 3) if ok else None,
            "baseline": match,
            "baseline_gbps": round(b, 3),
            "ratio": round(g / b, 3) if ok else None,
            # the limit: the same baseline with dxl's parallelism (copy threads, tcp streams)
            "limit": match,
            "limit_parallel": parallel,
            "limit_gbps": round(limit, 3),
            "limit_ratio": round(g / limit, 3) if ok else None,
            "limit_passes": rounded(self.base[f"{match}_limit"]),
            "p50_us": round(median(self.p50s), 1) if ok else None,
            "p99_us": round(median(self.p99s), 1) if ok else None,
            "verified": ok,
            "gbps_passes": rounded(self.gbps) if ok else None,
            "baseline_passes": rounded(self.base[match]),
            "p50_us_passes": rounded(self.p50s, 1) if ok else None,
            "p99_us_passes": rounded(self.p99s, 1) if ok else None,
            "baselines": {
                name: {"gbps": round(median(v), 3), "passes": rounded(v)}
                | ({"threads": self.threads} if name == "memcpy_limit" else {})
                | ({"streams": self._streams()} if name == "raw_socket_limit" else {})
                for name, v in self.base.items()
                if v
            },
            "thp_mib": thp,
            # one-stream / one-thread limits (no parallel run) leave "limit" empty: no figure
            "cpu_ms_per_gb": {k: round(median(v), 1) if v else None for k, v in cpu.items()},
            "cpu_ratio": round(median(cpu["dxl"]) / median(cpu["limit"]), 3)
            if ok and cpu["dxl"] and cpu["limit"]
            else None,
            "error": None if ok else "destination bytes differ from the source: UNVERIFIED",
        }


def throughput(
    w: Workload,
    target: TargetControl,
    info: dict[str, Any],
    progress: Callable[[int, str], None],
    why: Callable[[], str],
) -> dict[str, Any]:
    """Link, probe, then ``w.passes`` passes alternating dxl-first and baselines-first."""
    pull = w.op == "pull"
    local = destination_buffers(w) if pull else source_buffers(w)  # registered with dxl
    other = source_buffers(w) if pull else destination_buffers(w)  # memcpy partner
    driver = make_driver(w, why)
    sock: RawSocketClient | None = None
    streams: RawSocketClient | None = None
    try:
        link = driver.open(tuple(info["address"]), local)
        check_transport(w.transport, link)
        if w.baselines == "all" or link == TCP:
            host = w.hosts.target_ip
            sock = RawSocketClient(info["raw_port"], w.request_bytes, host=host)
            n = tcp_streams(w.request_bytes)
            if n > 1:
                streams = RawSocketClient(info["raw_port"], w.request_bytes, n, host=host)
        memcpy_pair = (local, other) if pull else (other, local)

        def cpu() -> float:
            own = resource.getrusage(resource.RUSAGE_SELF)
            return own.ru_utime + own.ru_stime + float(target.ask("cpu"))

        dest = Destination(w, local, target)
        run = _Passes(w, driver, dest, memcpy_pair, sock, streams, progress, cpu)
        run.set_link(link)
        verified = run.probe()
        for p in range(w.passes):
            tables = pass_tables(
                w.seed, p, w.num_blocks, w.blocks_per_request, w.warmup + w.requests
            )
            if p % 2:  # alternate the order so drift and noise hit both alike
                run.baselines(p, tables)
                verified &= run.dxl(p, tables)
            else:
                verified &= run.dxl(p, tables)
                run.baselines(p, tables)
        thp = {
            "target": round(float(target.ask("thp")), 1),
            "initiator": round(thp_mib(local, other), 1),
        }
    finally:
        for client in (sock, streams):
            if client is not None:
                client.close()
        driver.close()
    return run.row(link, verified, thp)


def initiator_main(
    w: Workload, target_conn: Connection, parent_conn: Connection, verbose: bool = False
) -> None:
    """Process entry (spawn): measure ``w`` against the target, send the row to the parent."""
    from .overhead import overhead

    logs = LogCapture(verbose)
    target = TargetControl(target_conn)

    def progress(units: int, label: str) -> None:
        parent_conn.send(("progress", units, label))

    try:
        if w.hosts.initiator_ns is not None:  # before any socket or thread of this process
            enter_netns(w.hosts.initiator_ns)
        info = target.ready()
        if w.mode == "overhead":
            row = overhead(w, target, info, progress, logs.why)
        else:
            row = throughput(w, target, info, progress, logs.why)
    except BenchFailure as exc:
        row = failed_row(w, str(exc))
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        detail = logs.why()
        row = failed_row(
            w, f"{type(exc).__name__}: {exc}" + (f" (dxl log: {detail})" if detail else "")
        )
    parent_conn.send(("result", row))
    with contextlib.suppress(BenchFailure, OSError):
        target.ask("done")
