"""Pool allocation and same-process copies (a mixin of the Engine): allocate_cache,
allocate_blocks_cache, deallocate_cache, deallocate_blocks_cache, copy_cache, copy_blocks,
swap_blocks. Planning lives in :mod:`dxl.localcopy`, memory in :mod:`dxl.pool`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import args, localcopy
from ._validate import check_isinstance
from .errors import LLMStatusCode
from .plan import Pieces
from .pool import HostPool, allocate_tensors
from .types import BlocksCacheKey, Cache, CacheDesc, CacheKey, Placement
from .usage import hold

if TYPE_CHECKING:
    from .registry import Layout, LocalCache

Status = LLMStatusCode


class LocalOps:
    """Allocation from the configured pools and local copies; relies on the Engine core."""

    _host_pool: HostPool | None

    def _open_pools(self) -> None:
        """Create the HOST pool of ``host_mem_pool_cfg`` (memfd-backed, pre-faulted)."""
        cfg = self._opts.host_mem_pool
        self._host_pool = HostPool(cfg, f"dxl-host-pool-{self._cluster_id}") if cfg else None

    def _close_pools(self) -> None:
        if self._host_pool is not None:
            self._host_pool.close(force=True)  # every cache was retired before this runs
            self._host_pool = None

    def _pool_for(self, op: str, desc: CacheDesc) -> HostPool:
        if desc.placement == Placement.DEVICE:
            raise args.fail(
                op,
                Status.LLM_FEATURE_NOT_ENABLED,
                "DEVICE allocation needs mem_pool_cfg and the cuda transport; this build has no "
                "cuda transport yet",
            )
        if self._host_pool is None:
            raise args.fail(
                op,
                Status.LLM_FEATURE_NOT_ENABLED,
                "no HOST memory pool: config memory pool firstly (LLMConfig.host_mem_pool_cfg)",
            )
        return self._host_pool

    async def allocate_cache(
        self, cache_desc: CacheDesc, cache_keys: list[CacheKey] | tuple[CacheKey, ...] = ()
    ) -> Cache:
        """Allocate a contiguous cache from the pool of its placement; key i binds batch i."""
        op = "allocate_cache"
        check_isinstance("cache_desc", cache_desc, CacheDesc, allow_none=False)
        check_isinstance("cache_keys", cache_keys, (list, tuple), allow_none=False, inner=CacheKey)
        return await self._allocate(op, cache_desc, False, None, cache_keys)

    async def allocate_blocks_cache(
        self, cache_desc: CacheDesc, blocks_cache_key: BlocksCacheKey | None = None
    ) -> Cache:
        """Allocate a blocks cache from the pool of its placement, optionally keyed."""
        op = "allocate_blocks_cache"
        check_isinstance("cache_desc", cache_desc, CacheDesc, allow_none=False)
        check_isinstance("blocks_cache_key", blocks_cache_key, BlocksCacheKey)
        model_id = blocks_cache_key.model_id if blocks_cache_key is not None else None
        return await self._allocate(op, cache_desc, True, model_id, ())

    async def _allocate(
        self,
        op: str,
        desc: CacheDesc,
        blocks: bool,
        model_id: int | None,
        keys: list[CacheKey] | tuple[CacheKey, ...],
    ) -> Cache:
        if desc.num_tensors == 0:
            raise args.param_invalid(op, "cache_desc.num_tensors must be > 0")
        self._require_running(op)
        pool = self._pool_for(op, desc)
        addrs = allocate_tensors(pool, desc.num_tensors, desc.size, op)
        try:  # remotely accessible: dxl-allocated caches exist to be transferred (stance 3)
            return await self._register(op, desc, addrs, blocks, model_id, True, keys, addrs)
        except BaseException:
            for addr in addrs:
                pool.free(addr)
            raise

    async def deallocate_cache(self, cache: Cache) -> None:
        """Release an allocated contiguous cache; deferred while CacheKeys are still bound."""
        await self._deallocate("deallocate_cache", cache, blocks=False)

    async def deallocate_blocks_cache(self, cache: Cache) -> None:
        """Release an allocated blocks cache."""
        await self._deallocate("deallocate_blocks_cache", cache, blocks=True)

    async def _deallocate(self, op: str, cache: Cache, blocks: bool) -> None:
        args.check_cache_arg(op, "cache", cache)
        if cache.is_blocks_cache != blocks:
            other = "deallocate_blocks_cache" if cache.is_blocks_cache else "deallocate_cache"
            kind = "a blocks cache" if blocks else "a contiguous cache"
            raise args.param_invalid(op, f"cache must be {kind}; use {other} for this one")
        self._require_running(op)
        if self._host_pool is None:
            raise args.fail(op, Status.LLM_FEATURE_NOT_ENABLED, "no memory pool is configured")
        entry = self._caches.get(cache.cache_id)
        if entry is None or entry.cache is not cache or entry.pool_addrs is None:
            return  # unknown or registered (user) memory: a no-op, as the reference
        cache._invalidate()
        entry.deallocated = True
        if not entry.bindings:
            await self._retire(entry)

    def _free_pool_memory(self, entry: LocalCache) -> None:
        if entry.pool_addrs is not None and self._host_pool is not None:
            for addr in entry.pool_addrs:
                self._host_pool.free(addr)
            entry.pool_addrs = []

    # ------------------------------------------------------------------ local copies
    async def copy_cache(
        self,
        dst: Cache,
        src: Cache,
        dst_batch_index: int = 0,
        src_batch_index: int = 0,
        offset: int = 0,
        size: int = -1,
        req_id: int | None = None,
    ) -> None:
        """Copy ``size`` bytes (-1: to the end of the batch) at ``offset`` of batch
        ``src_batch_index`` of every tensor of ``src`` to the same place in ``dst``."""
        op = "copy_cache"
        args.check_cache_arg(op, "dst", dst)
        args.check_cache_arg(op, "src", src)
        localcopy.check_copy_cache_args(dst_batch_index, src_batch_index, offset, size, req_id)
        self._require_running(op)
        d, s = self._local_for(op, dst), self._local_for(op, src)
        pieces = localcopy.plan_copy_cache(
            d.layout, s.layout, dst_batch_index, src_batch_index, offset, size
        )
        await self._copy_local(pieces, [d, s])

    async def copy_blocks(self, cache: Cache, copy_block_info: dict[int, list[int]]) -> None:
        """Within one blocks cache, copy block ``src`` to every block of its list."""
        op = "copy_blocks"
        args.check_cache_arg(op, "cache", cache)
        localcopy.check_copy_block_info(copy_block_info)
        self._require_running(op)
        entry = self._local_for(op, cache)
        pieces = localcopy.plan_copy_blocks(entry.layout, copy_block_info)
        await self._copy_local(pieces, [entry])

    async def swap_blocks(
        self, src_cache: Cache, dst_cache: Cache, src_to_dst: dict[int, int]
    ) -> None:
        """Copy blocks between two blocks caches (e.g. a registered cache and one from
        ``Cache.create_cpu_cache``): block ``k`` of ``src_cache`` to ``src_to_dst[k]``."""
        op = "swap_blocks"
        for name, cache in (("src_cache", src_cache), ("dst_cache", dst_cache)):
            args.check_cache_arg(op, name, cache)
            if not cache.is_blocks_cache:
                raise args.param_invalid(op, f"{name} must be a blocks cache")
        localcopy.check_src_to_dst(src_to_dst)
        self._require_running(op)
        src_layout, src_entry = self._swap_side(op, src_cache)
        dst_layout, dst_entry = self._swap_side(op, dst_cache)
        pieces = localcopy.plan_swap_blocks(src_layout, dst_layout, src_to_dst)
        await self._copy_local(pieces, [e for e in (src_entry, dst_entry) if e is not None])

    def _swap_side(self, op: str, cache: Cache) -> tuple[Layout, LocalCache | None]:
        """A registered cache's layout, or that of an unregistered ``create_cpu_cache`` one."""
        if cache.cache_id >= 0:
            entry = self._local_for(op, cache)
            return entry.layout, entry
        layout = self._layout(op, cache.cache_desc, cache.tensor_addrs, True)
        self._check_mapped(op, layout)
        return layout, None

    async def _copy_local(self, pieces: Pieces, entries: list[Any]) -> None:
        """One native copy on the executor, holding the caches until it returned."""
        release = hold([e.usage for e in entries])
        await self._run_native(
            localcopy.run_pieces, pieces, self._opts.transfer_threads, on_done=release
        )
