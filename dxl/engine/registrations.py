"""Registering memory and taking it back: framework memory (``register_*``), caches dxl
allocates from its HOST pool (``allocate_*``), and their ends.

A registration is checked in full first, then entered in the book, then announced to every
linked peer before the call returns (a remotely accessible one). Taking one back goes the other
way: peers are told and confirm they stopped using it, then local copies and tcp requests still
touching it are waited for, and only then are its regions, shared pages and pool memory freed.
"""

from __future__ import annotations

import asyncio
import logging

from .._validate import check_cache_arg, check_int64, check_isinstance
from ..config import EngineOptions
from ..control.messages import DataInfo, RegAdd, RegDel
from ..errors import LLMStatusCode, fail, param_invalid
from ..memory.layout import Layout, check_mapped, layout_of
from ..memory.pins import pin_hazard
from ..memory.pool import HostPool, allocate_tensors
from ..memory.share import SHARED, Window
from ..transport.names import AUTO, CMA, NIXL
from ..types import BlocksCacheKey, Cache, CacheDesc, CacheKey, Placement
from .book import CacheBook
from .links import LinkTable
from .listener import Listener
from .mover import Mover
from .registry import LocalCache
from .state import RunState

log = logging.getLogger("dxl")


class Registrations:
    """Memory this engine knows: registrations and allocations (see the module docstring)."""

    def __init__(
        self,
        options: EngineOptions,
        state: RunState,
        book: CacheBook,
        links: LinkTable,
        listener: Listener,
        mover: Mover,
        owner: object,
    ) -> None:
        self._opts = options
        self._state = state
        self._book = book
        self._links = links
        self._listener = listener
        self._mover = mover
        self._owner = owner  # the engine, as Cache.cache_manager
        self.pool: HostPool | None = None

    # ------------------------------------------------------------------ lifetime
    def open_pool(self, name: str) -> None:
        """Create the HOST pool of ``host_mem_pool_cfg`` (memfd-backed, pre-faulted)."""
        cfg = self._opts.host_mem_pool
        self.pool = HostPool(cfg, name) if cfg else None

    def pool_wire(self) -> list[int]:
        """The pool as peers map it, ``[fd, base, size]``; ``[]`` without one."""
        pool = self.pool
        return [pool.fd, pool.base, pool.size] if pool is not None else []

    async def close(self) -> None:
        """Release everything (the links are gone: no peer uses any of it)."""
        for entry in self._book:
            await entry.usage.wait_idle(float("inf"))
            self._book.release_regions(entry)
            _release_shared(entry)
        self._book.clear()

    def close_pool(self) -> None:
        if self.pool is not None:
            self.pool.close(force=True)  # every cache was retired before this runs
            self.pool = None

    # ------------------------------------------------------------------ registration
    async def register_blocks_cache(
        self,
        cache_desc: CacheDesc,
        addrs: list[int],
        blocks_cache_key: BlocksCacheKey | None = None,
        remote_accessible: bool | None = None,
        *,
        share: bool | None = None,
    ) -> Cache:
        """Register framework-allocated paged KV memory: ``addrs[i]`` is tensor i.

        Block k of tensor i is ``[k * block_bytes, (k + 1) * block_bytes)`` from ``addrs[i]``,
        with ``num_blocks = cache_desc.shape[0]``. ``remote_accessible`` defaults to True for
        DEVICE and False for HOST; only remotely accessible caches are visible to peers.
        ``share`` (dxl extension; None: the engine's ``dxl.ShareRegistered``, which unset
        shares automatically where nothing can have pinned the memory) moves the tensors'
        whole pages onto memfds in place so same-host peers copy them with memcpy; it needs a
        remotely accessible HOST cache (docs/api.md says when it is safe).
        """
        op = "register_blocks_cache"
        _check_register_args(op, cache_desc, addrs, remote_accessible, share)
        check_isinstance("blocks_cache_key", blocks_cache_key, BlocksCacheKey)
        model_id = blocks_cache_key.model_id if blocks_cache_key is not None else None
        entry = await self._register(
            op, cache_desc, addrs, True, model_id, remote_accessible, share=share
        )
        return entry.cache

    async def register_cache(
        self,
        cache_desc: CacheDesc,
        addrs: list[int],
        cache_keys: tuple[CacheKey, ...] | list[CacheKey] = (),
        remote_accessible: bool | None = None,
        *,
        share: bool | None = None,
    ) -> Cache:
        """Register framework-allocated contiguous memory: ``addrs[i]`` is tensor i, batch b of
        a tensor is ``[b * stride, (b + 1) * stride)`` with ``stride = size / shape[0]``; key
        i binds batch i. ``share`` as for :meth:`register_blocks_cache`."""
        op = "register_cache"
        _check_register_args(op, cache_desc, addrs, remote_accessible, share)
        check_isinstance("cache_keys", cache_keys, (list, tuple), allow_none=False, inner=CacheKey)
        entry = await self._register(
            op, cache_desc, addrs, False, None, remote_accessible, cache_keys, share=share
        )
        return entry.cache

    async def _register(
        self,
        op: str,
        desc: CacheDesc,
        addrs: list[int],
        blocks: bool,
        model_id: int | None,
        remote_accessible: bool | None,
        cache_keys: list[CacheKey] | tuple[CacheKey, ...] = (),
        pool_addrs: list[int] | None = None,
        share: bool | None = None,
    ) -> LocalCache:
        """Register a cache (user memory, or ``pool_addrs`` allocated by the engine): every
        check first, then the books, then peers are told before this returns."""
        self._state.require(op)
        device = desc.placement == Placement.DEVICE
        # device memory only where the transport moves it (nixl registers it as VRAM)
        layout = layout_of(op, desc, addrs, blocks, device=self._opts.transport == NIXL)
        bindings = self._book.check(op, layout, model_id, cache_keys)
        if remote_accessible is None:
            remote_accessible = device
        if device and share:
            raise param_invalid(op, "share=True is for HOST memory only")
        if not device:  # device pointers are not mapped in this process's address space
            check_mapped(op, layout)
        if share and not remote_accessible:
            raise param_invalid(
                op, "share=True needs remote_accessible=True: only memory peers read is shared"
            )
        auto = share is None and self._opts.share_registered is None
        if auto:  # dxl.ShareRegistered unset: where nothing can have pinned the memory
            share = remote_accessible and not device and pool_addrs is None and self._auto_share()
        elif share is None:
            share = bool(self._opts.share_registered) and not device
        shared: list[Window] = []
        if share and remote_accessible and pool_addrs is None:
            shared = await self._share(layout, auto)
            try:  # other registrations may have landed while the pages moved
                bindings = self._book.check(op, layout, model_id, cache_keys)
            except BaseException:
                SHARED.release(shared)
                raise
        entry = self._book.add(
            desc,
            layout,
            owner=self._owner,
            remote_accessible=remote_accessible,
            model_id=model_id,
            bindings=bindings,
            pool_addrs=pool_addrs,
            shared=shared,
        )
        if remote_accessible:
            async with self._book.lock:
                info = self._book.data_info(entry)
                if info:  # before the reg_add, so a peer reaches the memory it announces
                    await self._links.broadcast(DataInfo(info=info))
                await self._links.broadcast(RegAdd(cache=entry.wire_entry()))
        return entry

    def _auto_share(self) -> bool:
        """``dxl.ShareRegistered`` unset: share where a same-host peer may map the memory (the
        transport may be cma) and nothing in the process can have pinned it
        (:func:`dxl.memory.pins.pin_hazard`)."""
        if self._opts.transport not in (AUTO, CMA):
            return False
        hazard = pin_hazard()
        if hazard:
            log.info("dxl: registered memory is not shared automatically: %s", hazard)
        return not hazard

    async def _share(self, layout: Layout, auto: bool = False) -> list[Window]:
        """Move the tensors' whole pages onto memfds (``dxl.ShareRegistered``), on the
        workers: it copies the memory once."""
        ranges = [(a, a + layout.tensor_size) for a in layout.addrs.tolist()]
        got: list[list[Window]] = []
        try:
            await self._mover.run(lambda: got.append(SHARED.share(ranges, auto)))
        except asyncio.CancelledError:  # the call has finished: give its shares back
            for windows in got:
                SHARED.release(windows)
            raise
        return got[0]

    async def unregister_cache(self, cache_id: int) -> None:
        """Forget a registration. Linked peers are told first, and their transfers using it are
        waited for (bounded by sync_kv_timeout; a peer that does not confirm loses its link).
        An unknown id is a no-op."""
        check_int64("cache_id", cache_id)
        self._state.require("unregister_cache")
        entry = self._book.find(cache_id)
        if entry is None or entry.pool_addrs is not None:  # allocated caches: deallocate_*
            return
        await self.retire(entry)

    async def retire(self, entry: LocalCache) -> None:
        """Remove a cache from the books: peers first (they confirm they stopped using it),
        then local transfers, then the native regions and any pool memory."""
        async with self._book.lock:
            if not self._book.take(entry):
                return
            if entry.remote_accessible:
                await self._links.broadcast(RegDel(id=entry.cache.cache_id, gen=entry.gen))
        await entry.usage.wait_idle(float("inf"))  # local copies always finish: wait them out
        self._book.release_regions(entry)
        await self._listener.fence()  # tcp requests that passed the check have finished
        _release_shared(entry)  # peers confirmed: they unmapped it
        self._free_pool_memory(entry)

    async def republish(self, entry: LocalCache) -> None:
        """Send peers the new version of an entry whose key bindings changed."""
        self._book.bump(entry)
        if entry.remote_accessible:
            async with self._book.lock:
                await self._links.broadcast(RegAdd(cache=entry.wire_entry()))

    # ------------------------------------------------------------------ allocation
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
            raise param_invalid(op, "cache_desc.num_tensors must be > 0")
        self._state.require(op)
        pool = self._pool_for(op, desc)
        addrs = allocate_tensors(pool, desc.num_tensors, desc.size, op)
        try:  # remotely accessible: dxl-allocated caches exist to be transferred (stance 3)
            entry = await self._register(op, desc, addrs, blocks, model_id, True, keys, addrs)
        except BaseException:
            for addr in addrs:
                pool.free(addr)
            raise
        return entry.cache

    def _pool_for(self, op: str, desc: CacheDesc) -> HostPool:
        if desc.placement == Placement.DEVICE:
            raise fail(
                op,
                LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                "DEVICE allocation needs mem_pool_cfg and the cuda transport; this build has no "
                "cuda transport yet",
            )
        if self.pool is None:
            raise fail(
                op,
                LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                "no HOST memory pool: config memory pool firstly (LLMConfig.host_mem_pool_cfg)",
            )
        return self.pool

    async def deallocate_cache(self, cache: Cache) -> None:
        """Release an allocated contiguous cache; deferred while CacheKeys are still bound."""
        await self._deallocate("deallocate_cache", cache, blocks=False)

    async def deallocate_blocks_cache(self, cache: Cache) -> None:
        """Release an allocated blocks cache."""
        await self._deallocate("deallocate_blocks_cache", cache, blocks=True)

    async def _deallocate(self, op: str, cache: Cache, blocks: bool) -> None:
        check_cache_arg(op, "cache", cache)
        if cache.is_blocks_cache != blocks:
            other = "deallocate_blocks_cache" if cache.is_blocks_cache else "deallocate_cache"
            kind = "a blocks cache" if blocks else "a contiguous cache"
            raise param_invalid(op, f"cache must be {kind}; use {other} for this one")
        self._state.require(op)
        if self.pool is None:
            raise fail(op, LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "no memory pool is configured")
        entry = self._book.entry(cache)
        if entry is None or entry.pool_addrs is None:
            return  # unknown or registered (user) memory: a no-op, as the reference
        cache._invalidate()
        entry.deallocated = True
        if not entry.bindings:
            await self.retire(entry)

    def _free_pool_memory(self, entry: LocalCache) -> None:
        if entry.pool_addrs is not None and self.pool is not None:
            for addr in entry.pool_addrs:
                self.pool.free(addr)
            entry.pool_addrs = []


def _check_register_args(
    op: str, cache_desc: object, addrs: object, remote_accessible: object, share: object
) -> None:
    if cache_desc is None:
        raise AttributeError(f"{op}: cache_desc is None; pass a CacheDesc")
    check_isinstance("cache_desc", cache_desc, CacheDesc)
    check_isinstance("addrs", addrs, list, allow_none=False, inner=int)
    check_isinstance("remote_accessible", remote_accessible, bool)
    check_isinstance("share", share, bool)
    if not addrs:
        raise param_invalid(op, "addrs must not be empty")


def _release_shared(entry: LocalCache) -> None:
    SHARED.release(entry.shared)
    entry.shared = []
