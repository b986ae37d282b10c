"""Per-request overhead: a one-piece request end to end, and the time to plan a big request.

``overhead`` (initiator side, ``--overhead``): the cache is one tensor of small blocks, each
request moves one block (exactly one piece), one request at a time. It reports p50/p99 of the
dxl call (``await eng.pull_blocks(...)`` or the sync facade) and, as floors measured in the
same pass, the bare native call for that piece (``CmaTransport.read``/``write``: one
``process_vm_readv``/``writev``, plain cma links only: ``--memory private``, since registered
memory is shared by default) and a one-piece ``memcpy``. The difference
between dxl and the native floor is what the engine adds per request.

With the async API it also measures how long the event loop stalls while bursts of
concurrent one-piece requests run (``loop_stall``): a timer ticks every ``STALL_TICK_S`` on the
engine's loop and each tick's lateness is a stall sample. A burst starts ``min(num_blocks,
requests)`` requests at once (distinct blocks, one each) and awaits them all; bursts follow one
another until at least ``requests`` requests ran and ``STALL_MIN_TICKS`` ticks were sampled.
The baseline, measured in the same pass (in alternating order), is the same bursts of no-op
jobs awaited on a ``ThreadPoolExecutor`` with as many threads as the engine's executor: what
any asyncio application pays to offload that many calls. The idle loop's tick lateness is
reported beside them. The row carries each phase's worst and p99 stall (medians over passes)
and the ratios dxl / baseline.

``plan_timing`` (parent side): ``dxl.plan.block_pieces`` for a 128k-token, 64-layer request
(8192 blocks of 16 tokens x 128 tensors = 1,048,576 pieces), random ids (nothing coalesces)
and consecutive ids (everything per tensor coalesces).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..memory.plan import Pieces, Scratch, block_pieces
from ..transport.names import CMA
from .baselines import memcpy_requests, plan_requests
from .control import Destination
from .engines import engine_config
from .measure import AsyncDriver, check_transport, make_driver, median, percentiles_us, rounded
from .rows import row_base
from .workload import Workload, destination_buffers, pass_tables, source_buffers

PLAN_TOKENS = 128 * 1024
PLAN_TOKENS_PER_BLOCK = 16
PLAN_LAYERS = 64
PLAN_BLOCK_BYTES = 16 * 8 * 128 * 2  # 16 tokens x 8 KV heads x 128 dims x fp16 = 32 KiB

STALL_TICK_S = 0.001  # the ticker's period on the loop; a stall is a tick's lateness
STALL_MIN_TICKS = 100  # stall samples per phase and pass, at least
STALL_MAX_BURSTS = 1000  # a bound should bursts keep the ticker from ever running


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


async def _tick(samples: list[float], stop: asyncio.Event, limit: int | None = None) -> None:
    """Sleep ``STALL_TICK_S`` again and again and record how late each wake-up was (seconds),
    until ``stop`` is set or ``limit`` samples were taken."""
    clock = time.perf_counter
    while limit is None or len(samples) < limit:
        t0 = clock()
        await asyncio.sleep(STALL_TICK_S)
        if stop.is_set():
            return
        samples.append(max(0.0, clock() - t0 - STALL_TICK_S))


async def _stalls_during(burst: Callable[[], Awaitable[Any]], bursts: int) -> list[float]:
    """Tick lateness while ``burst()`` runs back to back: at least ``bursts`` times, and until
    ``STALL_MIN_TICKS`` samples were taken (at most ``STALL_MAX_BURSTS`` times)."""
    samples: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_tick(samples, stop))
    done = 0
    while done < bursts or (len(samples) < STALL_MIN_TICKS and done < STALL_MAX_BURSTS):
        await burst()
        done += 1
    stop.set()
    await ticker
    return samples


def _stall_figures(samples: list[float]) -> tuple[float, float]:
    """(worst, p99) of stall samples, in microseconds; (0, 0) for no sample."""
    if not samples:
        return 0.0, 0.0
    return max(samples) * 1e6, percentiles_us(samples)[1]


def _loop_stalls(
    driver: AsyncDriver, w: Workload, dest: Destination, p: int
) -> tuple[dict[str, tuple[float, float]], bool]:
    """One pass of the loop-stall measurement: ``{"idle"|"dxl"|"baseline": (worst, p99)}`` in
    microseconds, and whether every block the dxl bursts moved verifies."""
    n = min(w.num_blocks, w.requests)
    bursts = -(-w.requests // n)
    ids = np.random.default_rng([w.seed, p, 1]).permutation(n).tolist()
    move = driver._move  # the driver's bound request: await move([block]) moves one block
    assert move is not None
    workers = max(4, 2 * engine_config(w, listen=False).transfer_threads)  # as the engine's

    def noop() -> None:
        return None

    async def measure() -> dict[str, tuple[float, float]]:
        loop = asyncio.get_running_loop()
        idle: list[float] = []
        await _tick(idle, asyncio.Event(), limit=STALL_MIN_TICKS)
        out = {"idle": _stall_figures(idle)}

        async def dxl_burst() -> None:
            await asyncio.gather(*(move([b]) for b in ids))

        with ThreadPoolExecutor(workers, thread_name_prefix="bench-noop") as pool:

            async def noop_burst() -> None:
                await asyncio.gather(*(loop.run_in_executor(pool, noop) for _ in ids))

            await noop_burst()  # start the pool's threads before measuring
            order = [("dxl", dxl_burst), ("baseline", noop_burst)]
            for name, burst in order if p % 2 == 0 else order[::-1]:
                out[name] = _stall_figures(await _stalls_during(burst, bursts))
        return out

    dest.clear()
    figures = driver._call(measure())
    return figures, dest.verify(np.array(ids, dtype=np.int64))


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
    stalls: dict[str, list[tuple[float, float]]] = {"idle": [], "dxl": [], "baseline": []}
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
            if link == CMA:
                _native_floor(w, info, local, tables[: w.warmup])
                native.append(percentiles_us(_native_floor(w, info, local, tables[w.warmup :]))[0])
            plans = plan_requests(mdst.addrs, msrc.addrs, tables, w.block_bytes)
            _, mlat = memcpy_requests(plans)
            copy.append(percentiles_us(mlat[w.warmup :])[0])
            if isinstance(driver, AsyncDriver):
                progress(0, f"{w.label}: loop stall pass {p + 1}/{w.passes}")
                figures, ok = _loop_stalls(driver, w, dest, p)
                verified &= ok
                for name, pair in figures.items():
                    stalls[name].append(pair)
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
        **_stall_fields(stalls, w, ok),
        "gbps": None,
        "baseline": "native-call" if floor is not None else None,
        "baseline_gbps": None,
        "ratio": None,
        "error": None if ok else "destination bytes differ from the source: UNVERIFIED",
    }


def _stall_fields(
    stalls: dict[str, list[tuple[float, float]]], w: Workload, ok: bool
) -> dict[str, Any]:
    """The row's ``loop_*`` fields: medians over passes of each phase's worst and p99 stall
    (microseconds) and the ratios dxl / baseline; all None without the async API or when the
    bytes did not verify."""
    measured = bool(stalls["dxl"])
    fields: dict[str, Any] = {
        "loop_burst": min(w.num_blocks, w.requests) if measured else None,
        "loop_tick_ms": STALL_TICK_S * 1e3 if measured else None,
    }
    for phase in ("dxl", "baseline", "idle"):
        for i, stat in enumerate(("max", "p99")):
            values = [pair[i] for pair in stalls[phase]]
            fields[f"loop_{phase}_stall_{stat}_us"] = (
                round(median(values), 1) if ok and values else None
            )
            fields[f"loop_{phase}_stall_{stat}_us_passes"] = (
                rounded(values, 1) if ok and values else None
            )
    for stat in ("max", "p99"):
        mine = fields[f"loop_dxl_stall_{stat}_us"]
        base = fields[f"loop_baseline_stall_{stat}_us"]
        fields[f"loop_stall_{stat}_ratio"] = (
            round(mine / base, 2) if mine is not None and base else None
        )
    return fields


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
