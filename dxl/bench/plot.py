"""``--plot FILE.png``: GB/s against block size, dxl (solid) and its baselines (dashed).

matplotlib is imported only here and only when a plot is asked for (``pip install
'dxl[bench]'``); :func:`require_matplotlib` fails before any measurement when it is missing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .workload import format_size

_BASELINE_NAMES = {
    "memcpy": "memcpy 1 thread",
    "raw_socket": "raw socket 1 stream",
    "memcpy_limit": "memcpy, dxl's threads",
    "raw_socket_limit": "raw TCP, dxl's streams",
}


def require_matplotlib() -> None:
    """Raise SystemExit with the install hint when matplotlib is not importable."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "dxl bench: --plot needs matplotlib, which is not installed: "
            "pip install 'dxl[bench]' (or pip install matplotlib)"
        ) from None


def plot(rows: list[dict[str, Any]], path: str, title: str = "") -> int:
    """Write the plot of the verified throughput rows to ``path``; returns the series count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = defaultdict(dict)
    baselines: dict[str, dict[int, float]] = defaultdict(dict)
    for r in rows:
        if r.get("mode") != "bench" or not r.get("verified") or r.get("gbps") is None:
            continue
        link = r.get("link_transport") or r["transport"]
        name = f"dxl {link} {r['op']} {r['api']}" + (
            f" c{r['concurrency']}" if r["concurrency"] > 1 else ""
        )
        series[name][r["block_bytes"]] = r["gbps"]
        for base, v in (r.get("baselines") or {}).items():
            baselines[f"{_BASELINE_NAMES.get(base, base)} ({r['op']})"][r["block_bytes"]] = v[
                "gbps"
            ]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, pts in sorted(series.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
    for name, pts in sorted(baselines.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], linestyle="--", marker="x", label=name)
    ticks = sorted({x for pts in (*series.values(), *baselines.values()) for x in pts})
    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(ticks, [format_size(x) for x in ticks])
    ax.set_xlabel("block size B")
    ax.set_ylabel("GB/s (1e9 B/s of payload, median over passes)")
    ax.set_title(title or "dxl bench: KV-block transfer vs baselines")
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(series)
