"""Timing dxl requests through the async ``Engine`` or the sync ``LLMDataDist`` facade.

Both drivers expose the same blocking calls to the initiator's orchestration code: ``open``
(start, register, link), ``batch`` (run requests, ``concurrency`` in flight, and time them) and
``close``. The async driver runs the Engine on its own event-loop thread and times inside the
loop, so a measurement contains exactly what an asyncio application awaits: argument checks,
planning, the executor hop and the native copy. The sync driver calls the facade from the
initiator's threads, as a blocking application would.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np

from ..testing import KVBuffers
from .engines import cluster_info, engine_config, new_loop
from .workload import INITIATOR_ID, TARGET_ID, Workload

T = TypeVar("T")
LINK_TIMEOUT_MS = 10_000


class BenchFailure(Exception):
    """A configuration cannot produce a result; the message says why (no number is shown)."""


class Driver(Protocol):
    def open(self, address: tuple[str, int], kv: KVBuffers) -> str: ...

    def batch(self, requests: list[list[int]], concurrency: int) -> tuple[float, list[float]]: ...

    def close(self) -> None: ...


def _check_link(ret: Any, per: list[Any], stats: dict[str, Any], why: Callable[[], str]) -> str:
    from .. import LLMStatusCode

    if ret != LLMStatusCode.LLM_SUCCESS:
        detail = why()
        raise BenchFailure(
            f"link failed: {getattr(per[0], 'name', per[0])}" + (f" ({detail})" if detail else "")
        )
    link = stats["links"].get(TARGET_ID)
    if link is None:
        raise BenchFailure("link_clusters succeeded but the engine holds no link to the target")
    return str(link["transport"])


class AsyncDriver:
    """``dxl.Engine`` on a private event loop (uvloop when asked and installed)."""

    def __init__(self, w: Workload, why: Callable[[], str]) -> None:
        self._w = w
        self._why = why
        self._loop = new_loop(w.loop)
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="bench-loop", daemon=True
        )
        self._thread.start()
        self._eng: Any = None
        self._move: Callable[..., Coroutine[Any, Any, None]] | None = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def open(self, address: tuple[str, int], kv: KVBuffers) -> str:
        """Start the engine, register ``kv``, link to the target; returns the link's transport."""
        return self._call(self._open(address, kv))

    async def _open(self, address: tuple[str, int], kv: KVBuffers) -> str:
        from .. import BlocksCacheKey, Engine, LLMRole

        w = self._w
        self._eng = eng = Engine(INITIATOR_ID, LLMRole.DECODER, engine_config(w, listen=False))
        await eng.start()
        cache = await eng.register_blocks_cache(kv.desc(), kv.addrs)
        ret, per = await eng.link_clusters(
            [cluster_info(address, w.hosts.initiator_ip)], LINK_TIMEOUT_MS
        )
        transport = _check_link(ret, per, eng.stats(), self._why)
        key = BlocksCacheKey(TARGET_ID, 0)
        op = eng.pull_blocks if w.op == "pull" else eng.push_blocks

        def move(ids: list[int]) -> Coroutine[Any, Any, None]:
            return op(key, cache, ids, ids)

        self._move = move
        return transport

    def batch(self, requests: list[list[int]], concurrency: int) -> tuple[float, list[float]]:
        """Run ``requests`` with up to ``concurrency`` in flight: (wall s, per-request s)."""
        return self._call(self._batch(requests, concurrency))

    async def _batch(
        self, requests: list[list[int]], concurrency: int
    ) -> tuple[float, list[float]]:
        move = self._move
        assert move is not None
        lat: list[float] = []
        clock = time.perf_counter
        if concurrency <= 1:
            t0 = clock()
            for ids in requests:
                t1 = clock()
                await move(ids)
                lat.append(clock() - t1)
            return clock() - t0, lat
        todo = iter(requests)

        async def worker() -> None:
            for ids in todo:
                t1 = clock()
                await move(ids)
                lat.append(clock() - t1)

        t0 = clock()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return clock() - t0, lat

    def close(self) -> None:
        try:
            if self._eng is not None:
                self._call(self._eng.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._loop.is_running():
                self._loop.close()


class SyncDriver:
    """``dxl.LLMDataDist`` + ``CacheManager``, called from plain threads."""

    def __init__(self, w: Workload, why: Callable[[], str]) -> None:
        self._w = w
        self._why = why
        self._dd: Any = None
        self._move: Callable[[list[int]], None] | None = None
        self._info: Any = None

    def open(self, address: tuple[str, int], kv: KVBuffers) -> str:
        from .. import BlocksCacheKey, LLMDataDist, LLMRole

        w = self._w
        self._dd = dd = LLMDataDist(LLMRole.DECODER, INITIATOR_ID)
        dd.init(engine_config(w, listen=False).generate_options())
        cm = dd.cache_manager
        cache = cm.register_blocks_cache(kv.desc(), kv.addrs)
        self._info = cluster_info(address, w.hosts.initiator_ip)
        ret, per = dd.link_clusters([self._info], LINK_TIMEOUT_MS)
        transport = _check_link(ret, per, dd.engine.stats(), self._why)
        key = BlocksCacheKey(TARGET_ID, 0)
        op = cm.pull_blocks if w.op == "pull" else cm.push_blocks

        def move(ids: list[int]) -> None:
            op(key, cache, ids, ids)

        self._move = move
        return transport

    def batch(self, requests: list[list[int]], concurrency: int) -> tuple[float, list[float]]:
        move = self._move
        assert move is not None
        clock = time.perf_counter

        def one(ids: list[int]) -> float:
            t1 = clock()
            move(ids)
            return clock() - t1

        t0 = clock()
        if concurrency <= 1:
            lat = [one(ids) for ids in requests]
        else:
            with ThreadPoolExecutor(concurrency, thread_name_prefix="bench") as pool:
                lat = list(pool.map(one, requests))
        return clock() - t0, lat

    def close(self) -> None:
        if self._dd is not None:
            self._dd.finalize()
            self._dd = None


def check_transport(asked: str, link: str) -> None:
    """Refuse a link on another transport than the one asked for (``auto`` takes any)."""
    base = link.split("+", maxsplit=1)[0]  # "cma+shm" is cma with the peer's pool mapped
    if asked not in ("auto", base):
        raise BenchFailure(
            f"asked for transport {asked!r} but the link uses {link!r}: this build does not "
            f"honour dxl.Transport={asked} yet"
        )


def make_driver(w: Workload, why: Callable[[], str]) -> Driver:
    """The driver for ``w.api``."""
    return AsyncDriver(w, why) if w.api == "async" else SyncDriver(w, why)


def percentiles_us(lat_s: list[float]) -> tuple[float, float]:
    """(p50, p99) in microseconds."""
    p50, p99 = np.percentile(np.asarray(lat_s) * 1e6, [50, 99]).tolist()
    return float(p50), float(p99)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def rounded(values: list[float] | None, digits: int = 3) -> list[float] | None:
    return None if values is None else [round(v, digits) for v in values]
