"""The worker side of the dxl connector, without vLLM: a dxl engine on its own event-loop thread.

One :class:`WorkerSide` per vLLM worker (rank). ``register`` starts a dxl :class:`~dxl.Engine`
on a private loop thread (as the sync facade does), registers the KV caches (remotely
accessible: in pull mode the prefill writes into the decode's blocks) and returns the handshake
data for the scheduler. Each step the model thread calls :meth:`start` (from ``start_load_kv``:
it submits fetches, cancels and releases to the loop and returns at once — the model step
never waits for a transfer), :meth:`after_forward` (from ``wait_for_save``: makes the step's
offers, a few microseconds of loop work, so that they exist before the step's output leaves the
process) and :meth:`results` (from ``get_transfer_results``: drains what the loop thread
recorded, under a lock).

Each completion is reported exactly once: a fetch's end (done, failed, timed out, cancelled) in
``finished_recving``, with ``failed_recving`` and its blocks in ``failed_block_ids`` in the same
call if it failed; an offer's end in ``finished_sending`` once the scheduler handed it over
(ends of dropped offers are not reported: vLLM freed those blocks already).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib
import logging
import secrets
import sys
import threading
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ...datadist import _LoopThread
from ...handoff.ticket import FetchError, format_endpoint
from ...layers import Engine
from ...types import BlocksCacheKey, CacheDesc, DataType, LLMRole, Placement
from . import timing
from .config import DxlConnectorConfig
from .layout import KVLayout, TensorLike, kv_layout
from .scheduler import HandshakeData, Load, OfferPlan, StepPlan, ticket_for
from .stats import TransferStats
from .timing import stamp

log = logging.getLogger("dxl.vllm")
T = TypeVar("T")

__all__ = ["TransferResults", "WorkerSide"]

OFFER_WAIT_S = 10.0  # bound on making a step's offers (local work on the loop thread)
CLOSE_WAIT_S = 30.0


@dataclass(slots=True)
class TransferResults:
    """One snapshot of completions (each request appears once, ever)."""

    finished_sending: set[str] = field(default_factory=set)
    finished_recving: set[str] = field(default_factory=set)
    failed_recving: set[str] = field(default_factory=set)
    failed_block_ids: set[int] = field(default_factory=set)


def cuda_device_threads(thread: _LoopThread, device: int) -> None:
    """Make CUDA ``device`` current on the engine's loop thread and on every thread of its
    loop's default executor, where the NIXL agent is made, caches are registered with it and
    peers' metadata is loaded. Why: UCX disables CUDA IPC (NVLink) when it finds no current
    CUDA context there (vLLM's NIXL connector sets the device in its handshake thread for the
    same reason). Untested on a GPU (none was available)."""
    torch: Any = importlib.import_module("torch")  # the KV caches are torch tensors: loaded

    def current() -> None:
        torch.cuda.set_device(device)

    async def now() -> None:
        current()

    thread.call(now())
    thread.loop.set_default_executor(
        concurrent.futures.ThreadPoolExecutor(
            thread_name_prefix=f"dxl-cuda{device}", initializer=current
        )
    )


class WorkerSide:
    """See the module docstring."""

    def __init__(self, config: DxlConnectorConfig, rank: int = 0, world: int = 1) -> None:
        self.config = config
        self.rank = rank
        self.world = world
        self.layout: KVLayout | None = None
        self._thread: _LoopThread | None = None
        self._engine: Engine | None = None
        self._cache: Any = None
        self._lock = threading.Lock()
        self._results = TransferResults()
        # offers by id: made (not ended), ended but undecided (-> request id), handed, dropped
        self._made: dict[int, OfferPlan] = {}
        self._ends: dict[int, str] = {}
        self._handed: set[int] = set()
        self._dropped: set[int] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}  # fetches; touched on the loop only
        self._pending_aborts: list[concurrent.futures.Future[None]] = []
        # loads handed to the loop thread and not reported yet; set whenever a result is added
        # (an idle step's wait ends on it)
        self._in_flight: set[str] = set()
        self._ended = threading.Event()
        self._watcher: concurrent.futures.Future[None] | None = None
        self.handshake: HandshakeData | None = None
        self.transfer_stats = TransferStats()  # vLLM's get_kv_connector_stats takes it

    # ------------------------------------------------------------------ set-up
    def register(self, kv_caches: Mapping[str, TensorLike], num_blocks: int) -> HandshakeData:
        """Check the layout, start the engine, register the caches; returns the handshake data.
        CPU caches are registered as host memory; CUDA caches as ``Placement.DEVICE`` on their
        device, over the nixl transport. Raises
        :class:`~dxl.integrations.vllm.layout.LayoutError` if the layout cannot be moved, and
        ValueError if the transport cannot move it (CUDA caches without nixl, or with cma/tcp
        configured), before starting anything."""
        if self._engine is not None:
            raise RuntimeError("dxl connector: register_kv_caches was called twice")
        layout = kv_layout(kv_caches, num_blocks)
        # CUDA caches: the nixl transport and the device (ValueError, before anything starts)
        options = self.config.engine_options(self.rank, layout.device)
        cluster_id = secrets.randbits(62) + 1
        engine = Engine(cluster_id, LLMRole.MIX, options)
        thread = _LoopThread(f"dxl-vllm-{self.rank}")
        try:
            if layout.device is not None:
                cuda_device_threads(thread, layout.device)
            thread.call(engine.start())
            desc = CacheDesc(
                num_tensors=len(layout.addrs),
                shape=[layout.num_blocks, layout.block_bytes],
                data_type=DataType.DT_UINT8,
                placement=Placement.HOST if layout.device is None else Placement.DEVICE,
            )
            self._cache = thread.call(
                engine.register_blocks_cache(
                    desc,
                    list(layout.addrs),
                    BlocksCacheKey(cluster_id, 0),
                    remote_accessible=True,
                    share=self.config.share_registered and layout.device is None,
                )
            )
        except BaseException:
            thread.call(engine.close())
            thread.stop()
            raise
        self._engine, self._thread, self.layout = engine, thread, layout
        address = engine.listen_address
        assert address is not None
        self.handshake = HandshakeData(
            cluster_id=cluster_id,
            incarnation=engine.incarnation,
            endpoint=format_endpoint(address),
            cache_id=self._cache.cache_id,
            block_bytes=layout.block_bytes,
            num_tensors=len(layout.addrs),
            tensors_per_layer=layout.tensors_per_layer,
        )
        self._watcher = self._submit(self._watch_offers())
        if self.config.gil_switch_s > 0:  # process-wide: dxl's thread waits less for the GIL
            sys.setswitchinterval(self.config.gil_switch_s)
        log.info(
            "dxl: worker %d registered %d layers (%d tensors of %d blocks x %d bytes, in %s), "
            "listening on %s",
            self.rank,
            layout.num_layers,
            len(layout.addrs),
            layout.num_blocks,
            layout.block_bytes,
            "host memory" if layout.device is None else f"cuda:{layout.device}",
            self.handshake.endpoint,
        )
        return self.handshake

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("dxl connector: the KV caches are not registered yet")
        return self._engine

    def _loop(self) -> asyncio.AbstractEventLoop:
        if self._thread is None:
            raise RuntimeError("dxl connector: the KV caches are not registered yet")
        return self._thread.loop

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._thread is None:
            coro.close()
            raise RuntimeError("dxl connector: the KV caches are not registered yet")
        return asyncio.run_coroutine_threadsafe(coro, self._thread.loop)

    # ------------------------------------------------------------------ each step
    def start(self, plan: StepPlan) -> None:
        """``start_load_kv``: hand the step's transfers to the loop thread; never waits."""
        if plan.empty():
            return
        if self._engine is None:  # nothing registered (a worker without KV): report failures
            with self._lock:
                for load in plan.loads:
                    self._fail(load.request_id, load.block_ids)
            return
        with self._lock:
            for oid in plan.handed:
                req_id = self._ends.pop(oid, None)
                if req_id is not None:
                    self._results.finished_sending.add(req_id)
                else:
                    self._handed.add(oid)
            dropped = [oid for oid in plan.dropped if self._ends.pop(oid, None) is None]
            self._dropped.update(dropped)
            made = [self._made[oid] for oid in dropped if oid in self._made]
        self._pending_aborts = [f for f in self._pending_aborts if not f.done()]
        for p in made:
            self._pending_aborts.append(self._submit(self._abort_offer(p)))
        for tickets in plan.releases:
            ticket = self._my_ticket(tickets)
            if ticket is not None:
                self._submit(self._release(ticket))
        loop = self._loop()
        for req_id in plan.cancels:  # the fetch asks the prefill to stop, then reports
            loop.call_soon_threadsafe(self._cancel_fetch, req_id)
        for load in plan.loads:
            ticket = None if load.refused else self._my_ticket(load.tickets)
            if ticket is None:
                with self._lock:
                    self._fail(load.request_id, load.block_ids)
            else:
                stamp("load-started", load.request_id)
                with self._lock:
                    self._in_flight.add(load.request_id)
                loop.call_soon_threadsafe(self._spawn_fetch, load, ticket)

    def after_forward(self, plan: StepPlan) -> None:
        """``wait_for_save``: make the step's offers (after the forward wrote their KV)."""
        for req_id in plan.timed:
            stamp("first-step-done", req_id)
        if not plan.offers or self._engine is None:
            return
        aborts, self._pending_aborts = self._pending_aborts, []
        fut = self._submit(self._make_offers(plan, aborts))
        try:
            fut.result(OFFER_WAIT_S)
        except concurrent.futures.TimeoutError:
            log.error("dxl: offers of this step not made within %s s", OFFER_WAIT_S)
            return
        for p in plan.offers:
            stamp("offered", p.request_id)

    def results(self, plan: StepPlan | None = None) -> TransferResults:
        """``get_transfer_results``: what ended since the last call. In an idle step (``plan``
        ran no forward) with loads or handed offers in flight and nothing to report, first
        wait up to ``idle_wait_s`` for one to end: vLLM would only run the next empty step
        (its engine steps every millisecond while anything waits on a transfer), and each
        costs the transfer CPU time and the GIL; waiting, the end is reported at once."""
        wait_s = self.config.idle_wait_s if plan is not None and plan.idle else 0.0
        if wait_s > 0:
            with self._lock:
                r = self._results
                pending = bool(self._in_flight or self._handed) and not (
                    r.finished_recving or r.finished_sending
                )
                if pending:
                    self._ended.clear()
            if pending:
                self._ended.wait(wait_s)
        with self._lock:
            out, self._results = self._results, TransferResults()
        for req_id in out.finished_recving:
            stamp("load-returned", req_id)
        return out

    # ------------------------------------------------------------------ prefill: offers
    async def _make_offers(
        self, plan: StepPlan, aborts: list[concurrent.futures.Future[None]]
    ) -> None:
        if aborts:  # a request offered again (after a preemption) waits for its old offer's end
            await asyncio.gather(*(asyncio.wrap_future(f) for f in aborts), return_exceptions=True)
        handoff = self.engine.handoff
        for p in plan.offers:
            with self._lock:
                self._made[p.offer_id] = p
            try:
                await handoff.offer(
                    p.request_id,
                    self._cache,
                    list(p.block_ids),
                    tensors_per_layer=self.layout.tensors_per_layer if self.layout else 1,
                    lease_s=self.config.lease_s,
                    num_tokens=p.num_tokens,
                    offer_id=p.offer_id,
                    token=p.token,
                )
            except Exception as exc:  # the ticket goes out anyway: its fetch will fail
                log.error("dxl: offer of request %s failed: %s", p.request_id, exc)
                self._offer_ended(p.offer_id, p.request_id)

    async def _watch_offers(self) -> None:
        async for end in self.engine.handoff.finished():
            self.transfer_stats.offer_ended(end.reason.value)
            self._offer_ended(end.offer_id, end.request_id)

    def _offer_ended(self, offer_id: int, request_id: str) -> None:
        with self._lock:
            self._made.pop(offer_id, None)
            if offer_id in self._handed:
                self._handed.discard(offer_id)
                self._results.finished_sending.add(request_id)
                self._ended.set()
            elif offer_id in self._dropped:
                self._dropped.discard(offer_id)
            else:
                self._ends[offer_id] = request_id

    async def _abort_offer(self, plan: OfferPlan) -> None:
        assert self.handshake is not None
        ticket = ticket_for(self.handshake, plan, self.config.lease_s)
        await self.engine.handoff.abort(ticket)  # ends it (reported, then discarded) if live

    # ------------------------------------------------------------------ decode: fetches
    def _my_ticket(self, tickets: tuple[dict[str, Any], ...]) -> dict[str, Any] | None:
        if len(tickets) != self.world:
            log.error(
                "dxl: the prefill has %d tensor-parallel ranks, this decode %d: "
                "unlike sizes are not supported",
                len(tickets),
                self.world,
            )
            return None
        return tickets[self.rank]

    def _spawn_fetch(self, load: Load, ticket: dict[str, Any]) -> None:
        # on the loop thread: a later cancel (call_soon_threadsafe is FIFO) finds the task
        if load.request_id in self._tasks or self._engine is None:
            with self._lock:
                self._fail(load.request_id, load.block_ids)
            return
        task = asyncio.get_running_loop().create_task(self._fetch(load, ticket))
        self._tasks[load.request_id] = task
        task.add_done_callback(functools.partial(self._fetch_done, load, ticket))

    def _cancel_fetch(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:  # else it ended (and was reported) already
            task.cancel()

    async def _fetch(self, load: Load, ticket: dict[str, Any]) -> None:
        start = time.monotonic()
        if timing.enabled():  # a live link to the prefill already, or this fetch links first
            warm = ticket.get("cluster_id") in self.engine.stats()["links"]
            stamp("fetch-start", load.request_id, link="warm" if warm else "cold")
        await self.engine.handoff.fetch(
            ticket, self._cache, list(load.block_ids), timeout_s=self.config.fetch_timeout_s
        )
        layout = self.layout
        nbytes = len(load.block_ids) * layout.block_bytes * len(layout.addrs) if layout else 0
        self.transfer_stats.load_done(time.monotonic() - start, nbytes)
        stamp("fetch-end", load.request_id)

    def _fetch_done(self, load: Load, ticket: dict[str, Any], task: asyncio.Task[None]) -> None:
        """One load ended (also if it was cancelled before it started); reported now, never
        earlier: a fetch that gives up (timeout, cancel) returns only after the prefill
        confirmed that nothing writes our blocks any more."""
        self._tasks.pop(load.request_id, None)
        error = None if task.cancelled() else task.exception()
        with self._lock:
            if error is None and not task.cancelled():
                self._in_flight.discard(load.request_id)
                self._results.finished_recving.add(load.request_id)
                self._ended.set()
                return
            self._fail(load.request_id, load.block_ids, counted=not task.cancelled())
        if task.cancelled() and self._engine is not None:  # the prefill need not wait: tell it
            asyncio.get_running_loop().create_task(self._release(ticket))
        if error is not None:
            detail = error if isinstance(error, FetchError) else repr(error)
            log.warning("dxl: load of request %s failed: %s", load.request_id, detail)

    def _fail(self, request_id: str, block_ids: tuple[int, ...], counted: bool = True) -> None:
        if counted:  # a load this decode cancelled itself (request aborted) is not a failure
            self.transfer_stats.load_failed()
        self._in_flight.discard(request_id)
        self._results.finished_recving.add(request_id)
        self._results.failed_recving.add(request_id)
        self._results.failed_block_ids.update(block_ids)
        self._ended.set()

    async def _release(self, ticket: dict[str, Any]) -> None:
        try:
            await self.engine.handoff.abort(ticket)
        except Exception as exc:  # the prefill's lease frees the blocks then
            log.warning("dxl: could not release the offer of %s: %s", ticket.get("request_id"), exc)

    # ------------------------------------------------------------------ end
    def shutdown(self) -> None:
        """Stop: every fetch fails (reported), every offer ends (aborted), the engine closes."""
        thread, engine = self._thread, self._engine
        if thread is None or engine is None:
            return
        self._thread = self._engine = None
        if self._watcher is not None:
            self._watcher.cancel()
        try:
            asyncio.run_coroutine_threadsafe(self._close(engine), thread.loop).result(CLOSE_WAIT_S)
        except Exception as exc:
            log.warning("dxl: engine close: %r", exc)
        finally:
            thread.stop()

    async def _close(self, engine: Engine) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "fetches": len(self._tasks),
                "offers_made": len(self._made),
                "ended_undecided": len(self._ends),
                "handed": len(self._handed),
                "dropped": len(self._dropped),
            }
