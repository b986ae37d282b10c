"""Copies within this process: ``copy_cache``, ``copy_blocks``, ``swap_blocks``. Planning and
its rules live in :mod:`dxl.memory.localcopy`; the copy runs on the mover's workers."""

from __future__ import annotations

from .._validate import (
    check_cache_arg,
    check_copy_block_info,
    check_copy_cache_args,
    check_src_to_dst,
)
from ..errors import LLMStatusCode, fail, param_invalid
from ..memory import localcopy
from ..memory.layout import Layout, check_mapped, layout_of
from ..types import Cache, Placement
from .mover import Mover
from .registry import LocalCache
from .resolve import Resolver
from .state import RunState


class LocalCopies:
    """Local copy operations: resolve (our own registrations) -> plan -> one native copy."""

    def __init__(self, state: RunState, resolver: Resolver, mover: Mover) -> None:
        self._state = state
        self._resolver = resolver
        self._mover = mover

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
        check_cache_arg(op, "dst", dst)
        check_cache_arg(op, "src", src)
        check_copy_cache_args(dst_batch_index, src_batch_index, offset, size, req_id)
        self._state.require(op)
        d, s = self._resolver.local(op, dst), self._resolver.local(op, src)
        _host_only(op, d, s)
        pieces = localcopy.plan_copy_cache(
            d.layout, s.layout, dst_batch_index, src_batch_index, offset, size
        )
        await self._mover.copy_local(pieces, [d.usage, s.usage])

    async def copy_blocks(self, cache: Cache, copy_block_info: dict[int, list[int]]) -> None:
        """Within one blocks cache, copy block ``src`` to every block of its list."""
        op = "copy_blocks"
        check_cache_arg(op, "cache", cache)
        check_copy_block_info(copy_block_info)
        self._state.require(op)
        entry = self._resolver.local(op, cache)
        _host_only(op, entry)
        pieces = localcopy.plan_copy_blocks(entry.layout, copy_block_info)
        await self._mover.copy_local(pieces, [entry.usage])

    async def swap_blocks(
        self, src_cache: Cache, dst_cache: Cache, src_to_dst: dict[int, int]
    ) -> None:
        """Copy blocks between two blocks caches (e.g. a registered cache and one from
        ``Cache.create_cpu_cache``): block ``k`` of ``src_cache`` to ``src_to_dst[k]``."""
        op = "swap_blocks"
        for name, cache in (("src_cache", src_cache), ("dst_cache", dst_cache)):
            check_cache_arg(op, name, cache)
            if not cache.is_blocks_cache:
                raise param_invalid(op, f"{name} must be a blocks cache")
        check_src_to_dst(src_to_dst)
        self._state.require(op)
        src_layout, src_entry = self._swap_side(op, src_cache)
        dst_layout, dst_entry = self._swap_side(op, dst_cache)
        pieces = localcopy.plan_swap_blocks(src_layout, dst_layout, src_to_dst)
        held = [e.usage for e in (src_entry, dst_entry) if e is not None]
        await self._mover.copy_local(pieces, held)

    def _swap_side(self, op: str, cache: Cache) -> tuple[Layout, LocalCache | None]:
        """A registered cache's layout, or that of an unregistered ``create_cpu_cache`` one."""
        if cache.cache_id >= 0:
            entry = self._resolver.local(op, cache)
            _host_only(op, entry)
            return entry.layout, entry
        layout = layout_of(op, cache.cache_desc, cache.tensor_addrs, True)
        check_mapped(op, layout)
        return layout, None


def _host_only(op: str, *entries: LocalCache) -> None:
    """Local copies are memcpy: a DEVICE cache (registered for the nixl transport) is refused,
    never dereferenced."""
    for entry in entries:
        if entry.cache.cache_desc.placement != Placement.HOST:
            raise fail(
                op,
                LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                f"local copies move HOST memory only; cache {entry.cache.cache_id} is on the "
                "device",
            )
