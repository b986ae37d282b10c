"""The JSON row of one configuration: the fields every row carries, and a failed row."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .report import machine_line
from .workload import Workload


def row_base(w: Workload) -> dict[str, Any]:
    """The fields every row carries, result or failure."""
    from .. import __version__

    return {
        "mode": w.mode,
        "transport": w.transport,
        "op": w.op,
        "api": w.api,
        "block_bytes": w.block_bytes,
        "layers": w.layers,
        "tensors": w.tensors,
        "num_blocks": w.num_blocks,
        "cache_mib": round(w.cache_bytes / (1 << 20), 1),
        "blocks_per_request": w.blocks_per_request,
        "pieces_per_request": w.pieces_per_request,
        "request_bytes": w.request_bytes,
        "requests": w.requests,
        "warmup": w.warmup,
        "passes": w.passes,
        "concurrency": w.concurrency,
        "transfer_threads": w.transfer_threads,
        "loop": w.loop if w.api == "async" else None,
        "seed": w.seed,
        "huge_pages": w.huge_pages,
        "memory": w.memory,
        "netns": None if w.hosts.target_ns is None else _where(w),
        "dxl_version": __version__,
        "cpus": os.cpu_count(),
        "machine": machine_line(),
        "load_1m": round(os.getloadavg()[0], 2),  # at the end; includes the bench's own threads
    }


def _where(w: Workload) -> dict[str, Any]:
    """Where the two processes ran (``--netns``); the run's secret stays out of the row."""
    hosts = dataclasses.asdict(w.hosts)
    del hosts["auth_token"]
    return hosts


def failed_row(w: Workload, error: str) -> dict[str, Any]:
    """A configuration that produced no result: every number is null."""
    return {
        **row_base(w),
        "link_transport": None,
        "gbps": None,
        "baseline": None,
        "baseline_gbps": None,
        "ratio": None,
        "limit": None,
        "limit_parallel": None,
        "limit_gbps": None,
        "limit_ratio": None,
        "p50_us": None,
        "p99_us": None,
        "verified": False,
        "error": error,
    }
