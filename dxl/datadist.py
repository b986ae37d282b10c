"""LLM-DataDist-compatible synchronous API over the async Engine.

``LLMDataDist`` runs one :class:`~dxl.engine.Engine` on a private event-loop thread and each
method submits the matching coroutine and waits for it. There is no logic here beyond the
reference's lifecycle rules (one initialised instance per process, RuntimeError before init):
a second implementation would drift from the async one.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

from ._validate import check_dict, check_isinstance, check_uint32, check_uint64, ensure
from .engine import Engine
from .errors import LLMException, LLMStatusCode
from .types import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    CacheTask,
    LayerSynchronizer,
    LLMClusterInfo,
    LLMRole,
    MemInfo,
    Memtype,
    RegisterMemStatus,
    TransferConfig,
    TransferWithCacheKeyConfig,
)

T = TypeVar("T")

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


class LLMDataDist:
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
            LLMDataDist.llm_engine_instance = self

    def finalize(self) -> None:
        """Release everything; a no-op when not initialised."""
        if self._engine is None or self._loop is None:
            return
        try:
            self._loop.call(self._engine.close())
        finally:
            self._loop.stop()
            self._engine = self._loop = self._cache_manager = None
            with LLMDataDist._instance_lock:
                if LLMDataDist.llm_engine_instance is self:
                    LLMDataDist.llm_engine_instance = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError(_NOT_INITIALIZED)
        return self._loop.call(coro)

    def link_clusters(
        self,
        clusters: list[LLMClusterInfo] | tuple[LLMClusterInfo, ...],
        timeout: int = 3000,
    ) -> tuple[LLMStatusCode, list[LLMStatusCode]]:
        """Link to listening peers; failures are returned per cluster, not raised."""
        return self._call(self.engine.link_clusters(clusters, timeout))

    def unlink_clusters(
        self,
        clusters: list[LLMClusterInfo] | tuple[LLMClusterInfo, ...],
        timeout: int = 3000,
        force: bool = False,
    ) -> tuple[LLMStatusCode, list[LLMStatusCode]]:
        """Unlink peers (``force=True``: local end only)."""
        return self._call(self.engine.unlink_clusters(clusters, timeout, force))

    def link(self, comm_name: str, cluster_rank_info: dict[int, int], rank_table: str) -> int:
        """Double-sided link through an HCCL rank table: arguments are checked as the
        reference does, then refused, since rank tables describe Ascend devices; dxl links
        peer to peer with :meth:`link_clusters`."""
        self.engine  # noqa: B018 - raises RuntimeError before init, as the reference
        check_isinstance("comm_name", comm_name, str, allow_none=False)
        ensure(bool(comm_name) and len(comm_name) < 128, "comm_name must have 1..127 chars")
        check_dict("cluster_rank_info", cluster_rank_info, int, int)
        ensure(len(cluster_rank_info) <= 4, "cluster_rank_info holds at most 4 members")
        for cluster_id, rank in cluster_rank_info.items():
            check_uint64("cluster_rank_info key", cluster_id)
            check_uint32("cluster_rank_info value", rank)
        check_isinstance("rank_table", rank_table, str)
        ensure(len(cluster_rank_info) >= 2, "cluster_rank_info needs at least 2 members")
        ranks = list(cluster_rank_info.values())
        ensure(ranks == sorted(ranks), "cluster_rank_info ranks must ascend")
        raise LLMException(
            "link failed, rank-table communication domains are Ascend HCCL resources; "
            "use link_clusters (peer-to-peer links) with dxl",
            status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
        )

    def unlink(self, comm_id: int) -> None:
        """Counterpart of :meth:`link`; no domain can exist, so every id is unknown."""
        self.engine  # noqa: B018
        check_uint64("comm_id", comm_id)
        raise LLMException(
            f"unlink failed, no communication domain {comm_id} (dxl has no rank-table links)",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )

    def query_register_mem_status(self, comm_id: int) -> RegisterMemStatus:
        """Status of a :meth:`link` domain; none can exist in dxl, so FAILED."""
        self.engine  # noqa: B018
        check_uint64("comm_id", comm_id)
        return RegisterMemStatus.FAILED

    def check_link_status(self, remote_cluster_id: int) -> None:
        """v1 only; in v2 mode the reference raises LLM_PARAM_INVALID, and so does dxl."""
        self.engine  # noqa: B018
        raise LLMException(
            "check_link_status is v1-only; v2 links report failures on the transfer itself",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )

    def switch_role(self, role: LLMRole, switch_options: dict[str, str] | None = None) -> None:
        """Change role and listener (``llm.listenIpInfo`` in ``switch_options``)."""
        self._call(self.engine.switch_role(role, switch_options))

    @property
    def cache_manager(self) -> CacheManager:
        if self._cache_manager is None:
            raise RuntimeError(_NOT_INITIALIZED)
        return self._cache_manager

    @property
    def kv_cache_manager(self) -> Any:
        """v1 only; dxl runs v2 (CacheManager mode) only."""
        raise LLMException(
            "kv_cache_manager is v1-only; dxl implements the v2 cache_manager",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        )


class CacheManager:
    """The reference's v2 cache manager, obtained from ``LLMDataDist.cache_manager``."""

    def __init__(self, datadist: LLMDataDist) -> None:
        self._dd = datadist

    def register_cache(
        self,
        cache_desc: CacheDesc,
        addrs: list[int],
        cache_keys: tuple[CacheKey, ...] | list[CacheKey] = (),
        remote_accessible: bool | None = None,
    ) -> Cache:
        return self._dd._call(
            self._dd.engine.register_cache(cache_desc, addrs, cache_keys, remote_accessible)
        )

    def register_blocks_cache(
        self,
        cache_desc: CacheDesc,
        addrs: list[int],
        blocks_cache_key: BlocksCacheKey | None = None,
        remote_accessible: bool | None = None,
    ) -> Cache:
        return self._dd._call(
            self._dd.engine.register_blocks_cache(
                cache_desc, addrs, blocks_cache_key, remote_accessible
            )
        )

    def unregister_cache(self, cache_id: int) -> None:
        self._dd._call(self._dd.engine.unregister_cache(cache_id))

    def pull_blocks(
        self,
        src_cache_key: BlocksCacheKey,
        dst_cache: Cache,
        src_blocks: list[int] | tuple[int, ...] | None = (),
        dst_blocks: list[int] | tuple[int, ...] = (),
        **kwargs: Any,
    ) -> None:
        self._dd._call(
            self._dd.engine.pull_blocks(src_cache_key, dst_cache, src_blocks, dst_blocks, **kwargs)
        )

    def push_blocks(
        self,
        dst_cache_key: BlocksCacheKey,
        src_cache: Cache,
        src_blocks: list[int] | tuple[int, ...] = (),
        dst_blocks: list[int] | tuple[int, ...] = (),
        src_layer_range: range | None = None,
        dst_layer_range: range | None = None,
        tensor_num_per_layer: int = 2,
    ) -> None:
        self._dd._call(
            self._dd.engine.push_blocks(
                dst_cache_key,
                src_cache,
                src_blocks,
                dst_blocks,
                src_layer_range,
                dst_layer_range,
                tensor_num_per_layer,
            )
        )

    def pull_cache(
        self,
        cache_key: CacheKey | CacheKeyByIdAndIndex,
        cache: Cache,
        batch_index: int = 0,
        size: int = -1,
        **kwargs: Any,
    ) -> None:
        self._dd._call(self._dd.engine.pull_cache(cache_key, cache, batch_index, size, **kwargs))

    def push_cache(
        self,
        dst_cache_key: CacheKeyByIdAndIndex,
        src_cache: Cache,
        src_batch_index: int = 0,
        src_layer_range: range | None = None,
        dst_layer_range: range | None = None,
        size: int = -1,
        tensor_num_per_layer: int = 2,
    ) -> None:
        self._dd._call(
            self._dd.engine.push_cache(
                dst_cache_key,
                src_cache,
                src_batch_index,
                src_layer_range,
                dst_layer_range,
                size,
                tensor_num_per_layer,
            )
        )

    def transfer_cache_async(
        self,
        src_cache: Cache,
        layer_synchronizer: LayerSynchronizer,
        transfer_configs: list[TransferConfig | TransferWithCacheKeyConfig]
        | tuple[TransferConfig | TransferWithCacheKeyConfig, ...],
        src_block_indices: list[int] | tuple[int, ...] | None = None,
        dst_block_indices: list[int] | tuple[int, ...] | None = None,
        dst_block_memory_size: int | None = None,
    ) -> CacheTask:
        return self._dd._call(
            self._dd.engine.transfer_cache_async(
                src_cache,
                layer_synchronizer,
                transfer_configs,
                src_block_indices,
                dst_block_indices,
                dst_block_memory_size,
            )
        )

    def remove_cache_key(self, cache_key: CacheKey) -> None:
        self._dd._call(self._dd.engine.remove_cache_key(cache_key))

    @staticmethod
    def check_cache_key(cache_key: CacheKey) -> None:
        Engine.check_cache_key(cache_key)


    def allocate_cache(
        self, cache_desc: CacheDesc, cache_keys: list[CacheKey] | tuple[CacheKey, ...] = ()
    ) -> Cache:
        return self._dd._call(self._dd.engine.allocate_cache(cache_desc, cache_keys))

    def allocate_blocks_cache(
        self, cache_desc: CacheDesc, blocks_cache_key: BlocksCacheKey | None = None
    ) -> Cache:
        return self._dd._call(self._dd.engine.allocate_blocks_cache(cache_desc, blocks_cache_key))

    def deallocate_cache(self, cache: Cache) -> None:
        self._dd._call(self._dd.engine.deallocate_cache(cache))

    def deallocate_blocks_cache(self, cache: Cache) -> None:
        self._dd._call(self._dd.engine.deallocate_blocks_cache(cache))

    def copy_cache(
        self,
        dst: Cache,
        src: Cache,
        dst_batch_index: int = 0,
        src_batch_index: int = 0,
        offset: int = 0,
        size: int = -1,
        req_id: int | None = None,
    ) -> None:
        self._dd._call(
            self._dd.engine.copy_cache(
                dst, src, dst_batch_index, src_batch_index, offset, size, req_id
            )
        )

    def copy_blocks(self, cache: Cache, copy_block_info: dict[int, list[int]]) -> None:
        self._dd._call(self._dd.engine.copy_blocks(cache, copy_block_info))

    def swap_blocks(self, src_cache: Cache, dst_cache: Cache, src_to_dst: dict[int, int]) -> None:
        self._dd._call(self._dd.engine.swap_blocks(src_cache, dst_cache, src_to_dst))

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

def _finalize_at_exit() -> None:
    instance = LLMDataDist.llm_engine_instance
    if instance is not None:
        with contextlib.suppress(LLMException):
            instance.finalize()


atexit.register(_finalize_at_exit)
