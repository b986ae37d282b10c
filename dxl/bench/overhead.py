"""Per-request overhead: a one-piece request end to end, and the time to plan a big request.

``overhead`` (initiator side, ``--overhead``): the cache is one tensor of small blocks, each
request moves one block (exactly one piece), one request at a time. It reports p50/p99 of the
dxl call (``await eng.pull_blocks(...)`` or the sync facade) and, as floors measured in the
same pass, the bare native call for that piece (``CmaTransport.read``/``write``: one
``process_vm_readv``/``writev``, cma links only) and a one-piece ``memcpy``. The difference
between dxl and the native floor is what the engine adds per request.

``plan_timing`` (parent side): ``dxl.plan.block_pieces`` for a 128k-token, 64-layer request
(8192 blocks of 16 tokens x 128 tensors = 1,048,576 pieces), random ids (nothing coalesces)
and consecutive ids (everything per tensor coalesces).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..memory.plan import Pieces, Scratch, block_pieces
from .baselines import memcpy_requests, plan_requests
from .control import Destination
from .measure import check_transport, make_driver, median, percentiles_us, rounded
from .rows import row_base
from .workload import Workload, destination_buffers, pass_tables, source_buffers

PLAN_TOKENS = 128 * 1024
PLAN_TOKENS_PER_BLOCK = 16
PLAN_LAYERS = 64
PLAN_BLOCK_BYTES = 16 * 8 * 128 * 2  # 16 tokens x 8 KV heads x 128 dims x fp16 = 32 KiB


def _native_floor(
    w: Workload, info: dict[str, Any], local: Any, tables: list[np.ndarray]
) -> list[float]:
    """Seconds of each bare ``CmaTransport`` call moving the same single pieces."""
    from ..transport.cma import CmaTransport

    cma = CmaTransport(info["pid"], 1)
    remote = np.uint64(info["addrs"][0])
    here = np.uint64(local.addrs[0])
    bb = np.uint64(w.block_bytes)
    one = np.array([w.block_bytes], dtype=np.uint64)
    lat = []
    try:
        for t in tables:
            off = np.uint64(int(t[0])) * bb
            pieces = Pieces(
                np.array([here + off], dtype=np.uint64),
                np.array([remote + off], dtype=np.uint64),
                one,
            )
            if w.op == "push":  # write() moves src (local) -> dst (remote)
                pieces = Pieces(pieces.src, pieces.dst, one)
            t1 = time.perf_counter()
            if w.op == "pull":
                cma.read(pieces)
            else:
                cma.write(pieces)
            lat.append(time.perf_counter() - t1)
    finally:
        cma.close()
    return lat


def overhead(
    w: Workload,
    target: Any,
    info: dict[str, Any],
    progress: Callable[[int, str], None],
    why: Callable[[], str],
) -> dict[str, Any]:
    """Measure one-piece requests (``w.tensors == 1``, ``w.blocks_per_request == 1``)."""
    pull = w.op == "pull"
    local = destination_buffers(w) if pull else source_buffers(w)
    other = source_buffers(w) if pull else destination_buffers(w)
    mdst, msrc = (local, other) if pull else (other, local)
    dest = Destination(w, local, target)
    driver = make_driver(w, why)
    p50s: list[float] = []
    p99s: list[float] = []
    means: list[float] = []
    native: list[float] = []
    copy: list[float] = []
    verified = True
    try:
        link = driver.open(tuple(info["address"]), local)
        check_transport(w.transport, link)
        progress(1, f"{w.label}: overhead")
        for p in range(w.passes):
            progress(0, f"{w.label}: overhead pass {p + 1}/{w.passes}")
            tables = pass_tables(w.seed, p, w.num_blocks, 1, w.warmup + w.requests)
            ids = [t.tolist() for t in tables]
            dest.clear()
            driver.batch(ids[: w.warmup], 1)
            _, lat = driver.batch(ids[w.warmup :], w.concurrency)
            if w.debug_corrupt:
                dest.corrupt(int(tables[-1][0]))
            verified &= dest.verify(np.concatenate(tables))
            p50, p99 = percentiles_us(lat)
            p50s.append(p50)
            p99s.append(p99)
            means.append(float(np.mean(lat)) * 1e6)
            if link == "cma":
                _native_floor(w, info, local, tables[: w.warmup])
                native.append(percentiles_us(_native_floor(w, info, local, tables[w.warmup :]))[0])
            plans = plan_requests(mdst.addrs, msrc.addrs, tables, w.block_bytes)
            _, mlat = memcpy_requests(plans)
            copy.append(percentiles_us(mlat[w.warmup :])[0])
            progress(1, f"{w.label}: overhead pass {p + 1}/{w.passes}")
    finally:
        driver.close()
    ok = bool(verified)
    p50 = median(p50s)
    floor = median(native) if native else None
    return {
        **row_base(w),
        "link_transport": link,
        "verified": ok,
        "p50_us": round(p50, 2) if ok else None,
        "p99_us": round(median(p99s), 2) if ok else None,
        "mean_us": round(median(means), 2) if ok else None,
        "p50_us_passes": rounded(p50s, 2) if ok else None,
        "p99_us_passes": rounded(p99s, 2) if ok else None,
        "native_p50_us": None if floor is None else round(floor, 2),
        "native_p50_us_passes": rounded(native, 2) if native else None,
        "memcpy_p50_us": round(median(copy), 2),
        "added_us": round(p50 - floor, 2) if ok and floor is not None else None,
        "gbps": None,
        "baseline": "native-call" if floor is not None else None,
        "baseline_gbps": None,
        "ratio": None,
        "error": None if ok else "destination bytes differ from the source: UNVERIFIED",
    }


def plan_timing(repeats: int = 30) -> list[dict[str, Any]]:
    """Median and best seconds of ``block_pieces`` for a 128k-token, 64-layer request."""
    blocks = PLAN_TOKENS // PLAN_TOKENS_PER_BLOCK
    tensors = 2 * PLAN_LAYERS
    rng = np.random.default_rng(0)
    bases_dst = np.arange(tensors, dtype=np.uint64) * np.uint64(4 * blocks * PLAN_BLOCK_BYTES)
    bases_src = bases_dst + np.uint64(1 << 40)
    rows = []
    for name, ids in (
        ("random", rng.choice(4 * blocks, size=blocks, replace=False).astype(np.int64)),
        ("consecutive", np.arange(blocks, dtype=np.int64)),
    ):
        times = []
        pieces = 0
        scratch = Scratch()  # as the engine plans: large plans reuse its arrays
        for _ in range(repeats + 3):
            t0 = time.perf_counter()
            plan = block_pieces(bases_dst, bases_src, ids, ids, PLAN_BLOCK_BYTES, scratch)
            times.append(time.perf_counter() - t0)
            pieces = plan.count
            plan.release()
        times = times[3:]
        rows.append(
            {
                "mode": "plan",
                "ids": name,
                "tokens": PLAN_TOKENS,
                "layers": PLAN_LAYERS,
                "tensors": tensors,
                "blocks": blocks,
                "block_bytes": PLAN_BLOCK_BYTES,
                "pieces_in": blocks * tensors,
                "pieces_out": pieces,
                "median_ms": round(median(times) * 1e3, 3),
                "best_ms": round(min(times) * 1e3, 3),
                "repeats": repeats,
                "verified": True,
            }
        )
    return rows
