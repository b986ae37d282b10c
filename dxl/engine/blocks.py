"""``pull_blocks`` and ``push_blocks``: paged KV blocks between this engine and a linked peer."""

from __future__ import annotations

from .._validate import (
    block_list,
    check_blocks_in_range,
    check_cache_arg,
    check_isinstance,
    check_layer_ranges,
    check_tensor_num_per_layer,
    same_length,
)
from ..errors import param_invalid
from ..memory.plan import Scratch
from ..types import BlocksCacheKey, Cache, CacheKey, CacheKeyByIdAndIndex
from .contiguous import ContiguousOps
from .mover import Mover
from .resolve import Resolver, check_block_bytes, select
from .transfer import Blocks, Transfer


class BlockOps:
    """Block transfers: resolve -> plan (:func:`~dxl.memory.plan.block_pieces`) -> move."""

    def __init__(self, resolver: Resolver, mover: Mover, contiguous: ContiguousOps) -> None:
        self._resolver = resolver
        self._mover = mover
        self._contiguous = contiguous
        self._scratch = Scratch()  # reused arrays for very large plans

    async def pull_blocks(
        self,
        src_cache_key: BlocksCacheKey | CacheKey | CacheKeyByIdAndIndex,
        dst_cache: Cache,
        src_blocks: list[int] | tuple[int, ...] | None = (),
        dst_blocks: list[int] | tuple[int, ...] = (),
        *,
        src_layer_range: range | None = None,
        dst_layer_range: range | None = None,
        tensor_num_per_layer: int = 2,
    ) -> None:
        """Copy remote blocks ``src_blocks[i]`` of the peer's cache bound to ``src_cache_key``
        into local blocks ``dst_blocks[i]`` of ``dst_cache``, for every tensor (or the tensors
        of ``src_layer_range``/``dst_layer_range`` with ``tensor_num_per_layer`` per layer).

        With a ``CacheKey``/``CacheKeyByIdAndIndex`` the source is a contiguous batch, cut into
        chunks of the local block size: chunk i lands in ``dst_blocks[i]`` (``src_blocks``
        must be empty)."""
        op = "pull_blocks"
        check_isinstance(
            "src_cache_key",
            src_cache_key,
            (BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex),
            allow_none=False,
        )
        check_cache_arg(op, "dst_cache", dst_cache)
        src = block_list(op, "src_blocks", src_blocks)
        dst = block_list(op, "dst_blocks", dst_blocks)
        if not dst_cache.is_blocks_cache:
            raise param_invalid(op, "dst_cache must be a blocks cache")
        if dst.size == 0:
            raise param_invalid(op, "dst_blocks must not be empty")
        check_tensor_num_per_layer(op, tensor_num_per_layer)
        check_layer_ranges(src_layer_range, dst_layer_range)
        if not isinstance(src_cache_key, BlocksCacheKey):
            if src.size:
                raise param_invalid(
                    op, "src_blocks must be empty when pulling from a contiguous cache"
                )
            await self._contiguous.pull_into_blocks(
                op,
                src_cache_key,
                dst_cache,
                dst,
                src_layer_range,
                dst_layer_range,
                tensor_num_per_layer,
            )
            return
        if src.size == 0:
            raise param_invalid(op, "src_blocks must not be empty for a BlocksCacheKey")
        route = self._resolver.blocks(op, src_cache_key, dst_cache)
        local, remote = route.local.layout, route.remote.layout
        dst_bases, src_bases = select(
            op, local, remote, dst_layer_range, src_layer_range, tensor_num_per_layer, "dst", "src"
        )
        same_length(op, "src_blocks", src, "dst_blocks", dst)
        check_blocks_in_range(op, "src_blocks", src, remote.units)
        check_blocks_in_range(op, "dst_blocks", dst, local.units)
        check_block_bytes(op, local, remote)
        pieces = Blocks(dst_bases, src_bases, dst, src, local.unit_bytes, self._scratch)
        await self._mover.move(Transfer(op, route, pieces, write=False, inline=True))

    async def push_blocks(
        self,
        dst_cache_key: BlocksCacheKey,
        src_cache: Cache,
        src_blocks: list[int] | tuple[int, ...] = (),
        dst_blocks: list[int] | tuple[int, ...] = (),
        src_layer_range: range | None = None,
        dst_layer_range: range | None = None,
        tensor_num_per_layer: int = 2,
    ) -> None:
        """Copy local blocks ``src_blocks[i]`` of ``src_cache`` into blocks ``dst_blocks[i]`` of
        the peer's cache bound to ``dst_cache_key`` (all layers, or the given layer ranges)."""
        op = "push_blocks"
        check_isinstance("dst_cache_key", dst_cache_key, BlocksCacheKey, allow_none=False)
        check_cache_arg(op, "src_cache", src_cache)
        if not src_cache.is_blocks_cache:
            raise param_invalid(op, "src_cache must be a blocks cache")
        src = block_list(op, "src_blocks", src_blocks)
        dst = block_list(op, "dst_blocks", dst_blocks)
        if dst.size == 0:
            raise param_invalid(op, "dst_blocks must not be empty")
        check_tensor_num_per_layer(op, tensor_num_per_layer)
        check_layer_ranges(src_layer_range, dst_layer_range)
        same_length(op, "src_blocks", src, "dst_blocks", dst)
        route = self._resolver.blocks(op, dst_cache_key, src_cache)
        local, remote = route.local.layout, route.remote.layout
        src_bases, dst_bases = select(
            op,
            local,
            remote,
            src_layer_range,
            dst_layer_range,
            tensor_num_per_layer,
            "src",
            "dst",
        )
        check_blocks_in_range(op, "src_blocks", src, local.units)
        check_blocks_in_range(op, "dst_blocks", dst, remote.units)
        check_block_bytes(op, local, remote)
        pieces = Blocks(dst_bases, src_bases, dst, src, local.unit_bytes, self._scratch)
        await self._mover.move(Transfer(op, route, pieces, write=True, inline=True))
