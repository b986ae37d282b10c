"""LLM-DataDist-compatible synchronous API over the async Engine.

``LLMDataDist`` runs one :class:`~dxl.engine.Engine` on a private event-loop thread and each
method submits the matching coroutine and waits for it. There is no logic here beyond the
reference's lifecycle rules (one initialised instance per process, RuntimeError before init):
a second implementation would drift from the async one. So the methods are generated from the
Engine's (:func:`blocking`): same names, signatures and docstrings, made once.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

from ._validate import check_isinstance, check_uint64
from .errors import LLMException, LLMStatusCode
from .handoff.handoff import Handoff
from .handoff.ticket import Finished
from .layers import Engine
from .types import LLMRole, MemInfo, Memtype

T = TypeVar("T")
P = ParamSpec("P")

_NOT_INITIALIZED = "llm datadist is not initialized"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, the standard one otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _LoopThread:
    """A daemon thread running one event loop; coroutines are submitted to it."""

    def __init__(self, name: str) -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("dxl's sync API cannot be called from its own event-loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _Facade:
    """What :func:`blocking` needs of a sync facade: a way to run a coroutine of the engine."""

    def _sync(self, make: Callable[[Engine], Coroutine[Any, Any, T]]) -> T:
        raise NotImplementedError


def blocking(
    method: Callable[Concatenate[Engine, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[_Facade, P], T]:
    """A sync facade method that runs the Engine coroutine ``method`` and waits for it."""

    def call(self: _Facade, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._sync(lambda engine: method(engine, *args, **kwargs))

    functools.update_wrapper(call, method)
    return call


def blocking_handoff(
    method: Callable[Concatenate[Handoff, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[_Facade, P], T]:
    """:func:`blocking` for a method of the engine's :class:`~dxl.handoff.Handoff`."""

    def call(self: _Facade, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._sync(lambda engine: method(engine.handoff, *args, **kwargs))

    functools.update_wrapper(call, method)
    return call


async def _value(get: Callable[[], T]) -> T:
    """Read engine state on its loop thread (the loop owns it)."""
    return get()


class LLMDataDist(_Facade):
    """The reference's entry object: ``LLMDataDist(role, cluster_id)``, then ``init(options)``.

    Only one instance per process may be initialised at a time (``LLM_FAILED`` otherwise);
    the async :class:`dxl.Engine` has no such limit.
    """

    llm_engine_instance: ClassVar[LLMDataDist | None] = None
    _instance_lock = threading.Lock()

    def __init__(self, role: LLMRole, cluster_id: int) -> None:
        check_isinstance("role", role, LLMRole, allow_none=False)
        check_uint64("cluster_id", cluster_id)
        self._role = role
        self._cluster_id = cluster_id
        self._engine: Engine | None = None
        self._loop: _LoopThread | None = None
        self._cache_manager: CacheManager | None = None
        self._handoff: SyncHandoff | None = None

    @property
    def cluster_id(self) -> int:
        return self._cluster_id

    @property
    def engine(self) -> Engine:
        """The async Engine behind this facade (dxl extension)."""
        if self._engine is None:
            raise RuntimeError(_NOT_INITIALIZED)
        return self._engine

    def init(self, options: dict[str, str]) -> None:
        """Start the engine with the option dict of ``LLMConfig.generate_options()``."""
        if self._engine is not None:
            return
        check_isinstance("options", options, dict, allow_none=False)
        with LLMDataDist._instance_lock:
            if LLMDataDist.llm_engine_instance is not None:
                raise LLMException(
                    "init failed, Cannot init multiple LLMDataDists in one process",
                    status_code=LLMStatusCode.LLM_FAILED,
                )
            engine = Engine(self._cluster_id, self._role, dict(options))
            loop = _LoopThread(f"dxl-loop-{self._cluster_id}")
            try:
                loop.call(engine.start())
            except BaseException:
                loop.stop()
                raise
            self._engine, self._loop = engine, loop
            self._cache_manager = CacheManager(self)
            self._handoff = SyncHandoff(self)
            LLMDataDist.llm_engine_instance = self

    def finalize(self) -> None:
        """Release everything; a no-op when not initialised."""
        if self._engine is None or self._loop is None:
            return
        try:
            self._loop.call(self._engine.close())
        finally:
            self._loop.stop()
            self._engine = self._loop = self._cache_manager = self._handoff = None
            with LLMDataDist._instance_lock:
                if LLMDataDist.llm_engine_instance is self:
                    LLMDataDist.llm_engine_instance = None

    def _sync(self, make: Callable[[Engine], Coroutine[Any, Any, T]]) -> T:
        if self._engine is None or self._loop is None:
            raise RuntimeError(_NOT_INITIALIZED)
        return self._loop.call(make(self._engine))

    link_clusters = blocking(Engine.link_clusters)
    unlink_clusters = blocking(Engine.unlink_clusters)
    switch_role = blocking(Engine.switch_role)

    link = blocking(Engine.link)
    unlink = blocking(Engine.unlink)
    query_register_mem_status = blocking(Engine.query_register_mem_status)

    def check_link_status(self, remote_cluster_id: int) -> None:
        """v1 only; in v2 mode the reference raises LLM_PARAM_INVALID, and so does dxl."""
        self.engine  # noqa: B018
        raise LLMException(
            "check_link_status is v1-only; v2 links report failures on the transfer itself",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )

    @property
    def cache_manager(self) -> CacheManager:
        if self._cache_manager is None:
            raise RuntimeError(_NOT_INITIALIZED)
        return self._cache_manager

    @property
    def handoff(self) -> SyncHandoff:
        """Request handoff, blocking (dxl extension; docs/handoff.md)."""
        if self._handoff is None:
            raise RuntimeError(_NOT_INITIALIZED)
        return self._handoff

    @property
    def kv_cache_manager(self) -> Any:
        """v1 only; dxl runs v2 (CacheManager mode) only."""
        raise LLMException(
            "kv_cache_manager is v1-only; dxl implements the v2 cache_manager",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )


class CacheManager(_Facade):
    """The reference's v2 cache manager, obtained from ``LLMDataDist.cache_manager``."""

    def __init__(self, datadist: LLMDataDist) -> None:
        self._dd = datadist

    def _sync(self, make: Callable[[Engine], Coroutine[Any, Any, T]]) -> T:
        return self._dd._sync(make)

    register_cache = blocking(Engine.register_cache)
    register_blocks_cache = blocking(Engine.register_blocks_cache)
    unregister_cache = blocking(Engine.unregister_cache)
    allocate_cache = blocking(Engine.allocate_cache)
    allocate_blocks_cache = blocking(Engine.allocate_blocks_cache)
    deallocate_cache = blocking(Engine.deallocate_cache)
    deallocate_blocks_cache = blocking(Engine.deallocate_blocks_cache)
    pull_blocks = blocking(Engine.pull_blocks)
    push_blocks = blocking(Engine.push_blocks)
    pull_cache = blocking(Engine.pull_cache)
    push_cache = blocking(Engine.push_cache)
    transfer_cache_async = blocking(Engine.transfer_cache_async)
    remove_cache_key = blocking(Engine.remove_cache_key)
    check_cache_key = staticmethod(Engine.check_cache_key)
    copy_cache = blocking(Engine.copy_cache)
    copy_blocks = blocking(Engine.copy_blocks)
    swap_blocks = blocking(Engine.swap_blocks)

    def remap_registered_memory(self, mem_infos: Any) -> None:
        """Reserved in the reference (NIC re-registration after a device memory fault): the
        arguments are checked as documented, then LLM_FEATURE_NOT_ENABLED."""
        infos = mem_infos if isinstance(mem_infos, list) else [mem_infos]
        for i, info in enumerate(infos):
            if not isinstance(info, MemInfo):
                raise LLMException(
                    f"remap_registered_memory: mem_infos[{i}] must be a MemInfo",
                    status_code=LLMStatusCode.LLM_PARAM_INVALID,
                )
            if info.mem_type != Memtype.MEM_TYPE_DEVICE or info.addr == 0 or info.size <= 0:
                raise LLMException(
                    f"remap_registered_memory: mem_infos[{i}] must be DEVICE memory with a "
                    "non-zero addr and size > 0",
                    status_code=LLMStatusCode.LLM_PARAM_INVALID,
                )
        raise LLMException(
            "remap_registered_memory failed, the reference reserves it and dxl has no NIC "
            "registrations to remap",
            status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
        )


class SyncHandoff(_Facade):
    """The engine's request handoff (:class:`dxl.handoff.Handoff`) for synchronous callers,
    from ``LLMDataDist.handoff``: the same methods, each waiting for its result. A fetch's
    ``on_layer`` callback runs on the engine's loop thread. Finished offers are polled
    (``poll_finished``) or waited for (``wait_finished``) rather than iterated."""

    def __init__(self, datadist: LLMDataDist) -> None:
        self._dd = datadist

    def _sync(self, make: Callable[[Engine], Coroutine[Any, Any, T]]) -> T:
        return self._dd._sync(make)

    offer = blocking_handoff(Handoff.offer)
    offer_destination = blocking_handoff(Handoff.offer_destination)
    fetch = blocking_handoff(Handoff.fetch)
    push = blocking_handoff(Handoff.push)
    complete = blocking_handoff(Handoff.complete)
    abort = blocking_handoff(Handoff.abort)
    renew = blocking_handoff(Handoff.renew)
    wait_finished = blocking_handoff(Handoff.wait_finished)

    def poll_finished(self) -> list[Finished]:
        """The offers that ended since the last call (each exactly once)."""
        return self._sync(lambda engine: _value(engine.handoff.poll_finished))

    def live(self) -> int:
        """Offers of this engine not ended yet."""
        return self._sync(lambda engine: _value(engine.handoff.live))

    def stats(self) -> dict[str, Any]:
        """The handoff's counters (see :meth:`dxl.handoff.Handoff.stats`)."""
        return self._sync(lambda engine: _value(engine.handoff.stats))

    @property
    def max_fetches(self) -> int:
        return self._sync(lambda engine: _value(lambda: engine.handoff.max_fetches))

    @max_fetches.setter
    def max_fetches(self, value: int) -> None:
        def assign(engine: Engine) -> Coroutine[Any, Any, None]:
            def set_it() -> None:
                engine.handoff.max_fetches = value

            return _value(set_it)

        self._sync(assign)


def _finalize_at_exit() -> None:
    instance = LLMDataDist.llm_engine_instance
    if instance is not None:
        with contextlib.suppress(LLMException):
            instance.finalize()


atexit.register(_finalize_at_exit)
