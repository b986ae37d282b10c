"""What the user sees: a one-line progress bar on stderr and the tables at the end.

A result that was not verified, or that failed, is never shown as a number: the table prints
``UNVERIFIED`` or ``FAILED`` and the reason is listed under it.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from typing import Any, TextIO

from .workload import format_size


class Progress:
    """``[#####-----]  42%  1:05 eta 1:30  cma pull async c1 64K: pass 2/3 dxl`` on one line."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total = max(1, total)
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._label = ""
        self._t0 = time.monotonic()
        self._shown = 0

    def label(self, text: str) -> None:
        self._label = text
        self._draw()

    def advance(self, units: int, text: str) -> None:
        self.done = min(self.total, self.done + units)
        self._label = text
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        width = 24
        frac = self.done / self.total
        fill = int(frac * width)
        elapsed = time.monotonic() - self._t0
        eta = f" eta {_clock(elapsed / frac - elapsed)}" if 0 < frac < 1 else ""
        line = f"[{'#' * fill}{'-' * (width - fill)}] {frac:4.0%} {_clock(elapsed)}{eta}  "
        line += self._label
        cols = shutil.get_terminal_size((100, 20)).columns - 1
        line = line[:cols]
        self.stream.write("\r" + line + " " * max(0, self._shown - len(line)))
        self.stream.flush()
        self._shown = len(line)

    def close(self) -> None:
        """Erase the bar."""
        if self.enabled and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"


def machine_line() -> str:
    """``dxl 0.1.0 | 2 CPUs (model) | Linux 6.x | Python 3.11.7``: the context of a table."""
    from .. import __version__

    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None
            )
    except OSError:
        pass
    if model is None:  # only then: on Linux platform.processor() runs `uname -p` in a process
        model = platform.processor() or "?"
    return (
        f"dxl {__version__} | {os.cpu_count()} CPUs ({model}) | {platform.system()} "
        f"{platform.release()} | Python {platform.python_version()}"
    )


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _status(row: dict[str, Any]) -> str | None:
    """None when the row has a verified result, else what to print instead of a number."""
    if row.get("verified") and not row.get("error"):
        return None
    return "UNVERIFIED" if row.get("link_transport") else "FAILED"


def _markdown(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)
    ]
    fmt = "| " + " | ".join(f"{{:>{w}}}" for w in widths) + " |"
    lines = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*r) for r in body]
    return lines


def _limit_name(row: dict[str, Any]) -> str:
    """``memcpy x2`` / ``tcp x4``: the limit's kind and its threads or streams (``-`` for rows
    saved before the bench measured a limit)."""
    kind = {"memcpy": "memcpy", "raw_socket": "tcp"}.get(row.get("limit") or "")
    return f"{kind} x{row.get('limit_parallel')}" if kind else "-"


def bench_table(rows: list[dict[str, Any]]) -> list[str]:
    """Throughput rows as a markdown table (medians over passes)."""
    header = [
        "B",
        "k",
        "pieces",
        "MiB/req",
        "pages",
        "transport",
        "op",
        "api",
        "conc",
        "dxl GB/s",
        "memcpy GB/s",
        "socket GB/s",
        "ratio",
        "vs",
        "limit",
        "limit GB/s",
        "vs limit",
        "p50 ms",
        "p99 ms",
    ]
    body = []
    for r in rows:
        bl = r.get("baselines") or {}
        bad = _status(r)
        link = r.get("link_transport")
        transport = r["transport"] if link in (None, r["transport"]) else f"{r['transport']}>{link}"
        body.append(
            [
                format_size(r["block_bytes"]),
                str(r["blocks_per_request"]),
                str(r["pieces_per_request"]),
                f"{r['request_bytes'] / (1 << 20):.0f}",
                "THP" if r.get("huge_pages") else "4K",
                transport,
                r["op"],
                r["api"],
                str(r["concurrency"]),
                bad or _num(r["gbps"]),
                _num(bl.get("memcpy", {}).get("gbps")),
                _num(bl.get("raw_socket", {}).get("gbps")),
                bad or _num(r["ratio"]),
                {"memcpy": "memcpy", "raw_socket": "socket"}.get(r.get("baseline") or "", "-"),
                _limit_name(r),
                _num(r.get("limit_gbps")),
                bad or _num(r.get("limit_ratio")),
                bad or _num(r["p50_us"] and r["p50_us"] / 1e3),
                bad or _num(r["p99_us"] and r["p99_us"] / 1e3),
            ]
        )
    return _markdown(header, body)


def vllm_table(rows: list[dict[str, Any]]) -> list[str]:
    """The vLLM connector's path (``--vllm``): the decode's load beside the limit."""
    header = [
        "transport",
        "B",
        "heads",
        "layers",
        "k",
        "MiB/req",
        "load GB/s",
        "memcpy GB/s",
        "socket GB/s",
        "ratio",
        "limit",
        "limit GB/s",
        "vs limit",
        "load p50 ms",
        "load p99 ms",
        "offer p50 ms",
    ]
    body = []
    for r in rows:
        bad = _status(r)
        bl = r.get("baselines") or {}
        offer = r.get("offer_p50_us")
        body.append(
            [
                r.get("link_transport") or r["transport"],
                format_size(r["block_bytes"]),
                str(r.get("kv_heads", "-")),
                str(r["layers"]),
                str(r["blocks_per_request"]),
                f"{r['request_bytes'] / (1 << 20):.0f}",
                bad or _num(r.get("gbps")),
                _num(bl.get("memcpy", {}).get("gbps")),
                _num(bl.get("raw_socket", {}).get("gbps")),
                bad or _num(r.get("ratio")),
                _limit_name(r),
                _num(r.get("limit_gbps")),
                bad or _num(r.get("limit_ratio")),
                bad or _num(r["p50_us"] and r["p50_us"] / 1e3),
                bad or _num(r["p99_us"] and r["p99_us"] / 1e3),
                bad or _num(None if offer is None else offer / 1e3),
            ]
        )
    return _markdown(header, body)


def overhead_table(rows: list[dict[str, Any]]) -> list[str]:
    """One-piece request latency rows as a markdown table."""
    header = [
        "transport",
        "op",
        "api",
        "B",
        "dxl p50 us",
        "dxl p99 us",
        "mean us",
        "native p50 us",
        "added us",
        "memcpy p50 us",
    ]
    body = []
    for r in rows:
        bad = _status(r)
        body.append(
            [
                r.get("link_transport") or r["transport"],
                r["op"],
                r["api"],
                format_size(r["block_bytes"]),
                bad or _num(r["p50_us"], "{:.1f}"),
                bad or _num(r["p99_us"], "{:.1f}"),
                bad or _num(r.get("mean_us"), "{:.1f}"),
                _num(r.get("native_p50_us"), "{:.1f}"),
                bad or _num(r.get("added_us"), "{:.1f}"),
                _num(r.get("memcpy_p50_us"), "{:.1f}"),
            ]
        )
    return _markdown(header, body)


def loop_stall_table(rows: list[dict[str, Any]]) -> list[str]:
    """Event-loop stall rows (overhead rows of the async API) as a markdown table."""
    header = [
        "transport",
        "op",
        "loop",
        "burst",
        "dxl max ms",
        "dxl p99 ms",
        "no-op max ms",
        "no-op p99 ms",
        "idle max ms",
        "ratio max",
        "ratio p99",
    ]
    body = []
    for r in rows:
        bad = _status(r)

        def ms(key: str, r: dict[str, Any] = r) -> str:
            value = r.get(key)
            return _num(None if value is None else value / 1e3, "{:.2f}")

        body.append(
            [
                r.get("link_transport") or r["transport"],
                r["op"],
                r.get("loop") or "-",
                str(r.get("loop_burst") or "-"),
                bad or ms("loop_dxl_stall_max_us"),
                bad or ms("loop_dxl_stall_p99_us"),
                ms("loop_baseline_stall_max_us"),
                ms("loop_baseline_stall_p99_us"),
                ms("loop_idle_stall_max_us"),
                bad or _num(r.get("loop_stall_max_ratio")),
                bad or _num(r.get("loop_stall_p99_ratio")),
            ]
        )
    return _markdown(header, body)


def plan_table(rows: list[dict[str, Any]]) -> list[str]:
    """Planning-time rows as a markdown table."""
    header = ["request", "block ids", "pieces in", "pieces out", "median ms", "best ms"]
    body = [
        [
            f"{r['tokens'] // 1024}k tokens x {r['layers']} layers",
            r["ids"],
            str(r["pieces_in"]),
            str(r["pieces_out"]),
            f"{r['median_ms']:.3f}",
            f"{r['best_ms']:.3f}",
        ]
        for r in rows
    ]
    return _markdown(header, body)


def handoff_table(rows: list[dict[str, Any]]) -> list[str]:
    """Handoff latency rows (offer -> ticket -> fetch -> done) beside plain pull_blocks."""
    header = [
        "transport",
        "B",
        "k",
        "MiB/req",
        "handoff p50 ms",
        "handoff p99 ms",
        "fetch() p50 ms",
        "pull p50 ms",
        "pull p99 ms",
        "ratio p50",
        "ratio p99",
    ]
    body = []
    for r in rows:
        bad = _status(r)

        def ms(key: str, r: dict[str, Any] = r) -> str:
            value = r.get(key)
            return _num(None if value is None else value / 1e3)

        body.append(
            [
                r.get("link_transport") or r["transport"],
                format_size(r["block_bytes"]),
                str(r["blocks_per_request"]),
                f"{r['request_bytes'] / (1 << 20):.0f}",
                bad or ms("handoff_p50_us"),
                bad or ms("handoff_p99_us"),
                bad or ms("fetch_p50_us"),
                ms("pull_p50_us"),
                ms("pull_p99_us"),
                bad or _num(r.get("ratio_p50")),
                bad or _num(r.get("ratio_p99")),
            ]
        )
    return _markdown(header, body)


def fanin_table(rows: list[dict[str, Any]]) -> list[str]:
    """Fan-in rows: N prefill engines fetched at once by one decode, beside one link."""
    header = [
        "transport",
        "prefills",
        "B",
        "k",
        "MiB/offer",
        "fan-in GB/s",
        "one link GB/s",
        "ratio",
        "fetch p50 ms",
        "fetch p99 ms",
    ]
    body = []
    for r in rows:
        bad = _status(r)
        p50, p99 = r.get("fanin_fetch_p50_us"), r.get("fanin_fetch_p99_us")
        body.append(
            [
                r.get("link_transport") or r["transport"],
                str(r["prefills"]),
                format_size(r["block_bytes"]),
                str(r["blocks_per_request"]),
                f"{r['request_bytes'] / (1 << 20):.0f}",
                bad or _num(r.get("fanin_gbps")),
                _num(r.get("single_gbps")),
                bad or _num(r.get("ratio")),
                bad or _num(None if p50 is None else p50 / 1e3),
                bad or _num(None if p99 is None else p99 / 1e3),
            ]
        )
    return _markdown(header, body)


def render(rows: list[dict[str, Any]], command: str) -> str:
    """Every table for ``rows``, with the machine and the command, and the failures below."""
    out = [machine_line(), f"command: {command}", ""]
    bench = [r for r in rows if r.get("mode") == "bench"]
    over = [r for r in rows if r.get("mode") == "overhead"]
    plan = [r for r in rows if r.get("mode") == "plan"]
    stall = [r for r in over if r.get("api") == "async" and "loop_burst" in r]
    handoff = [r for r in rows if r.get("mode") == "handoff"]
    fanin = [r for r in rows if r.get("mode") == "fanin"]
    vllm = [r for r in rows if r.get("mode") == "vllm"]
    if bench:
        out += [
            "Throughput (GB/s = 1e9 B/s of payload; medians over passes; ratio = dxl / "
            "the one-thread (one-stream) baseline of the link's transport; vs limit = dxl / "
            "the same baseline with dxl's parallelism: memcpy of the same pieces with dxl's "
            "copy threads (cma), raw TCP with as many streams as dxl opens (tcp)):",
            "",
            *bench_table(bench),
            "",
        ]
    if over:
        out += [
            "One-piece request latency (medians over passes of each pass's p50/p99):",
            "",
            *overhead_table(over),
            "",
        ]
    if stall:
        out += [
            "Event-loop stall while bursts of concurrent one-piece requests run (lateness of a "
            f"{stall[0].get('loop_tick_ms', '?')} ms timer on the loop; medians over passes; "
            "no-op = the same bursts of no-op jobs on a thread pool, measured in the same pass; "
            "ratio = dxl / no-op):",
            "",
            *loop_stall_table(stall),
            "",
        ]
    if handoff:
        out += [
            "Request handoff latency (offer -> ticket -> fetch -> the offerer sees done, timed "
            "on the offerer; fetch() = the decode's call; pull = pull_blocks of the same blocks "
            "over the same link, same passes; medians over passes of each pass's p50/p99; "
            "ratio = handoff / pull):",
            "",
            *handoff_table(handoff),
            "",
        ]
    if fanin:
        out += [
            "Handoff fan-in (N prefill engines' offers fetched at once by one decode, beside "
            "the same N offers of one prefill engine fetched one after another over one link; "
            "GB/s = 1e9 B/s of payload, medians over passes; ratio = fan-in / one link):",
            "",
            *fanin_table(fanin),
            "",
        ]
    if vllm:
        out += [
            "vLLM connector path (register_kv_caches of vLLM's CPU layout; per request the "
            "prefill worker offers, the decode worker loads: load = get_num_new_matched_tokens "
            "-> start_load_kv -> get_transfer_results reports it; GB/s = 1e9 B/s of payload "
            "over the loads' time, medians over passes; ratio = load / the one-thread "
            "(one-stream) baseline; vs limit = load / memcpy of the same pieces with dxl's "
            "copy threads (same host) or raw TCP with dxl's streams (tcp); offer = the "
            "prefill's after_forward):",
            "",
            *vllm_table(vllm),
            "",
        ]
    if plan:
        out += ["Planning (dxl.plan.block_pieces):", "", *plan_table(plan), ""]
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        label = r.get("label") or (
            f"{r['transport']} {r['op']} {r['api']} c{r['concurrency']} "
            f"{format_size(r['block_bytes'])}"
        )
        out.append(f"{_status(r)}: {label}: {r['error']}")
    return "\n".join(out).rstrip() + "\n"
