"""Merge ``dxl bench --json`` output with the peer runners' into one markdown table.

Rows: op x block size (pieces and MiB per request shown); columns: dxl per link transport
(async API, one request in flight, unless other configurations are in the input), dxl's
same-run baselines (memcpy of the same pieces and raw TCP, each with one thread or stream and
with dxl's count, the limit), every peer variant, and
``dxl / best peer``. A cell is the configuration's median over its passes (the median of those
when several files hold the same cell). Unverified or failed cells are never numbers;
skipped peers are listed under the table.

    dxl bench --transport cma tcp --op pull --json > dxl.jsonl
    python benchmarks/peers/nixl_bench.py --json > nixl.jsonl
    python benchmarks/peers/mooncake_bench.py --json > mooncake.jsonl
    python benchmarks/peers/compare.py dxl.jsonl nixl.jsonl mooncake.jsonl [--metric p50_ms]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from typing import Any

BASELINES = {
    "memcpy": "memcpy (1 thread)",
    "memcpy_limit": "memcpy (dxl's threads)",
    "raw_socket": "raw socket (1 stream)",
    "raw_socket_limit": "raw TCP (dxl's streams)",
}


def load(paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        with open(path) as f:
            for n, raw in enumerate(f, 1):
                text = raw.strip()
                if not text.startswith("{"):
                    continue
                try:
                    rows.append(json.loads(text))
                except json.JSONDecodeError as exc:
                    print(f"{path}:{n}: skipped a line that is not JSON ({exc})", file=sys.stderr)
    return rows


def _fmt_size(n: int) -> str:
    for unit, shift in (("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _column(row: dict[str, Any]) -> str:
    if "system" in row:
        name = f"{row['system']} {row.get('variant', '')}".strip()
        if row.get("ucx_tls"):
            name += f" UCX_TLS={row['ucx_tls']}"
        return name
    name = f"dxl {row.get('link_transport') or row['transport']}"
    if row.get("api") != "async":
        name += f" {row['api']}"
    if row.get("concurrency", 1) != 1:
        name += f" c{row['concurrency']}"
    return name


def _value(row: dict[str, Any], metric: str) -> float | None:
    if metric == "gbps":
        return row.get("gbps")
    us = row.get(metric.replace("_ms", "_us"))
    return None if us is None else us / 1e3


def table(rows: list[dict[str, Any]], metric: str = "gbps") -> str:
    """The markdown comparison of ``rows`` (dxl bench rows and peer rows)."""
    cells: dict[tuple[str, int], dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    shape: dict[tuple[str, int], tuple[int, int]] = {}
    dxl_cols: list[str] = []
    peer_cols: list[str] = []
    base_cols: list[str] = []
    skipped = []
    for r in rows:
        if "skipped" in r:
            skipped.append(f"{r['system']}: {r['skipped']}")
            continue
        if r.get("mode", "bench") != "bench":
            continue
        key = (r["op"], r["block_bytes"])
        shape[key] = (r["pieces_per_request"], r["request_bytes"])
        col = _column(r)
        (peer_cols if "system" in r else dxl_cols).append(col)
        ok = r.get("verified") and not r.get("error")
        if ok:
            cells[key][col].append(_value(r, metric))
        else:
            bad = str(r.get("error") or "").startswith("destination bytes differ")
            cells[key][col].append("UNVERIFIED" if bad else "FAILED")
        if metric == "gbps" and "system" not in r:
            for name, b in (r.get("baselines") or {}).items():
                col_b = BASELINES.get(name, name)
                base_cols.append(col_b)
                cells[key][col_b].append(b["gbps"])
    dxl_cols = list(dict.fromkeys(dxl_cols))
    peer_cols = list(dict.fromkeys(peer_cols))
    base_cols = [c for c in BASELINES.values() if c in base_cols]
    unit = {"gbps": "GB/s", "p50_ms": "p50 ms", "p99_ms": "p99 ms"}[metric]
    header = ["op", "B", "pieces/req", "MiB/req", *dxl_cols, *base_cols, *peer_cols]
    if dxl_cols and peer_cols:
        header.append("dxl / best peer" if metric == "gbps" else "best peer / dxl")
    out = [
        f"{unit}, median over passes",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for key in sorted(cells, key=lambda k: (k[0], k[1])):
        op, bb = key
        pieces, nbytes = shape[key]
        line = [op, _fmt_size(bb), str(pieces), f"{nbytes / (1 << 20):.0f}"]
        best: dict[str, float] = {}
        for group, cols in (("dxl", dxl_cols), ("base", base_cols), ("peer", peer_cols)):
            for col in cols:
                vals = cells[key].get(col, [])
                nums = [v for v in vals if isinstance(v, int | float)]
                if nums:
                    v = statistics.median(nums)
                    line.append(f"{v:.2f}")
                    if group != "base":
                        pick = max if metric == "gbps" else min
                        best[group] = pick(best.get(group, v), v)
                elif vals:
                    line.append(str(vals[-1]))
                else:
                    line.append("-")
        if dxl_cols and peer_cols:
            if "dxl" in best and "peer" in best and best["peer"] and best["dxl"]:
                ratio = (
                    best["dxl"] / best["peer"] if metric == "gbps" else best["peer"] / best["dxl"]
                )
                line.append(f"{ratio:.2f}")
            else:
                line.append("-")
        out.append("| " + " | ".join(line) + " |")
    for s in skipped:
        out.append(f"\nskipped: {s}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="JSON-lines files (dxl bench --json, peer runners)")
    p.add_argument("--metric", choices=("gbps", "p50_ms", "p99_ms"), default="gbps")
    args = p.parse_args(argv)
    print(table(load(args.files), args.metric), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
