"""Operations on contiguous caches and CacheKeys: pull_cache, push_cache, contiguous -> blocks
pulls, key removal and key consumption.

A contiguous cache has ``B = shape[0]`` batches per tensor, batch ``b`` of tensor ``t`` being
``[b * S, (b + 1) * S)`` from ``addrs[t]`` with stride ``S = tensor_size / B``.
"""

from __future__ import annotations

import logging

import numpy as np

from .. import _validate as v
from ..config import EngineOptions
from ..control.messages import Consume
from ..errors import LLMException, param_invalid
from ..types import Cache, CacheKey, CacheKeyByIdAndIndex
from .book import CacheBook
from .keys import Binding, index_of, key_index
from .link import Link
from .links import LinkTable
from .mover import Mover
from .registrations import Registrations
from .registry import LocalCache, RemoteCache
from .resolve import KeyRow, Resolver, Route, select
from .state import RunState
from .transfer import Offsets, Transfer

log = logging.getLogger("dxl")


class ContiguousOps:
    """pull_cache / push_cache / CacheKey handling: resolve -> plan -> move, and the owner's
    side of keyed pulls (consumption)."""

    def __init__(
        self,
        options: EngineOptions,
        resolver: Resolver,
        mover: Mover,
        book: CacheBook,
        links: LinkTable,
        registrations: Registrations,
        state: RunState,
    ) -> None:
        self._opts = options
        self._state = state
        self._resolver = resolver
        self._mover = mover
        self._book = book
        self._registrations = registrations
        links.on("consume", self._on_consume)

    # ------------------------------------------------------------------ public operations
    async def pull_cache(
        self,
        cache_key: CacheKey | CacheKeyByIdAndIndex,
        cache: Cache,
        batch_index: int = 0,
        size: int = -1,
        *,
        src_layer_range: range | None = None,
        dst_layer_range: range | None = None,
        tensor_num_per_layer: int = 2,
    ) -> None:
        """Copy one batch of a peer's contiguous cache (found by ``cache_key``) into batch
        ``batch_index`` of the local contiguous ``cache``: ``size`` bytes per tensor (-1: the
        local stride), all tensors or the layers of ``src_layer_range``/``dst_layer_range``."""
        op = "pull_cache"
        key_types = (
            CacheKeyByIdAndIndex
            if self._opts.enable_remote_cache_accessible
            else (CacheKey, CacheKeyByIdAndIndex)
        )
        v.check_isinstance("cache_key", cache_key, key_types, allow_none=False)
        v.check_cache_arg(op, "cache", cache)
        v.check_uint32("batch_index", batch_index)
        v.check_int64("size", size)
        if cache.is_blocks_cache:
            raise param_invalid(op, "cache must be a contiguous cache, not a blocks cache")
        if size != -1 and size <= 0:
            raise param_invalid(op, f"size must be -1 or > 0, got {size}")
        v.check_tensor_num_per_layer(op, tensor_num_per_layer)
        v.check_layer_ranges(src_layer_range, dst_layer_range)
        if isinstance(cache_key, CacheKey):
            v.check_cache_key(op, cache_key)
        route, rbatch, bound = self._resolver.batch(op, cache_key, cache)
        local, remote = route.local.layout, route.remote.layout
        l_stride, r_stride = local.unit_bytes, remote.unit_bytes
        if batch_index >= local.units:
            raise param_invalid(
                op, f"batch_index {batch_index} >= the {local.units} batches of cache"
            )
        nbytes = l_stride if size == -1 else size
        if nbytes > l_stride or nbytes > r_stride:
            raise param_invalid(
                op,
                f"size {nbytes} exceeds the local stride {l_stride} or the remote stride "
                f"{r_stride}",
            )
        dst_bases, src_bases = select(
            op, local, remote, dst_layer_range, src_layer_range, tensor_num_per_layer, "dst", "src"
        )
        pieces = Offsets(
            dst_bases,
            src_bases,
            np.array([batch_index * l_stride], dtype=np.uint64),
            np.array([rbatch * r_stride], dtype=np.uint64),
            nbytes,
        )
        await self._mover.move(Transfer(op, route, pieces, write=False))
        await self._after_keyed_pull(route, bound, src_layer_range, tensor_num_per_layer)

    async def push_cache(
        self,
        dst_cache_key: CacheKeyByIdAndIndex,
        src_cache: Cache,
        src_batch_index: int = 0,
        src_layer_range: range | None = None,
        dst_layer_range: range | None = None,
        size: int = -1,
        tensor_num_per_layer: int = 2,
    ) -> None:
        """Write batch ``src_batch_index`` of the local contiguous ``src_cache`` into batch
        ``dst_cache_key.batch_index`` of the peer's cache ``dst_cache_key.cache_id``."""
        op = "push_cache"
        v.check_isinstance("dst_cache_key", dst_cache_key, CacheKeyByIdAndIndex, allow_none=False)
        v.check_cache_arg(op, "src_cache", src_cache)
        if src_cache.is_blocks_cache:
            raise param_invalid(op, "src_cache must be a contiguous cache")
        v.check_uint32("src_batch_index", src_batch_index)
        v.check_tensor_num_per_layer(op, tensor_num_per_layer)
        v.check_layer_ranges(src_layer_range, dst_layer_range)
        v.check_int64("size", size)
        if size != -1:
            raise param_invalid(op, f"size must be -1 (the whole batch), got {size}")
        route, rbatch, _ = self._resolver.batch(op, dst_cache_key, src_cache)
        local, remote = route.local.layout, route.remote.layout
        l_stride, r_stride = local.unit_bytes, remote.unit_bytes
        if src_batch_index >= local.units:
            raise param_invalid(
                op,
                f"src_batch_index {src_batch_index} >= the {local.units} batches of src_cache",
            )
        if l_stride > r_stride:
            raise param_invalid(
                op, f"a local batch ({l_stride} bytes) does not fit a remote batch ({r_stride})"
            )
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
        pieces = Offsets(
            dst_bases,
            src_bases,
            np.array([rbatch * r_stride], dtype=np.uint64),
            np.array([src_batch_index * l_stride], dtype=np.uint64),
            l_stride,
        )
        await self._mover.move(Transfer(op, route, pieces, write=True))

    async def pull_into_blocks(
        self,
        op: str,
        key: CacheKey | CacheKeyByIdAndIndex,
        dst_cache: Cache,
        dst: np.ndarray,
        src_range: range | None,
        dst_range: range | None,
        tnpl: int,
    ) -> None:
        """``pull_blocks`` from a contiguous source: chunk i of the remote batch (local block
        size) lands in local block ``dst[i]``."""
        if isinstance(key, CacheKey):
            v.check_cache_key(op, key)
        route, rbatch, bound = self._resolver.batch(op, key, dst_cache)
        local, remote = route.local.layout, route.remote.layout
        bb = local.unit_bytes
        v.check_blocks_in_range(op, "dst_blocks", dst, local.units)
        if dst.size * bb > remote.unit_bytes:
            raise param_invalid(
                op,
                f"{dst.size} blocks of {bb} bytes exceed the remote batch of "
                f"{remote.unit_bytes} bytes",
            )
        dst_bases, src_bases = select(op, local, remote, dst_range, src_range, tnpl, "dst", "src")
        chunks = np.arange(dst.size, dtype=np.uint64) * np.uint64(bb)
        src_off = np.uint64(rbatch * remote.unit_bytes) + chunks
        pieces = Offsets(dst_bases, src_bases, dst.astype(np.uint64) * np.uint64(bb), src_off, bb)
        await self._mover.move(Transfer(op, route, pieces, write=False))
        await self._after_keyed_pull(route, bound, src_range, tnpl)

    async def remove_cache_key(self, cache_key: CacheKey) -> None:
        """Unbind a key on this (owner) side; later pulls by it fail. Unknown keys and keys
        of registered (user-memory) caches are left alone."""
        v.check_isinstance("cache_key", cache_key, CacheKey, allow_none=False)
        self._state.require("remove_cache_key")
        binding = self._book.keys.get(cache_key)
        if binding is None:
            return
        entry = self._book.find(binding.cache_id)
        if entry is None or entry.pool_addrs is None:
            return
        await self._unbind(entry, binding)

    @staticmethod
    def check_cache_key(cache_key: CacheKey) -> None:
        """Raise LLMException(LLM_PARAM_INVALID) unless exactly one of req_id/prefix_id is set."""
        v.check_isinstance("cache_key", cache_key, CacheKey, allow_none=False)
        v.check_cache_key("check_cache_key", cache_key)

    # ------------------------------------------------------------------ key consumption
    async def _after_keyed_pull(
        self, route: Route, bound: KeyRow | None, src_range: range | None, tnpl: int
    ) -> None:
        """Tell the owner a keyed batch was pulled, so it can consume the key (it decides:
        only allocated caches, and only without remote-cache-accessible mode)."""
        if bound is None:
            return
        remote: RemoteCache = route.remote
        if src_range is None:
            tensors = [0, remote.layout.num_tensors]
        else:
            tensors = [src_range.start * tnpl, src_range.stop * tnpl]
        link: Link = route.link
        try:
            await link.channel.request(
                Consume(id=remote.cache_id, key=bound, tensors=tensors),
                self._opts.sync_kv_timeout_ms / 1000,
            )
        except LLMException as exc:  # the data arrived; only the owner's bookkeeping lags
            log.warning(
                "dxl: cluster %d did not confirm key consumption: %s", link.peer.cluster_id, exc
            )

    async def _on_consume(self, link: Link, msg: Consume) -> None:
        """Owner side of a keyed pull: mark the pulled tensors; a fully pulled key of an
        allocated cache is unbound (and the cache freed if it was deallocated)."""
        req_id, model_id, prefix_id, batch = msg.key
        lo, hi = msg.tensors
        entry = self._book.find(msg.id)
        binding = next(
            (
                b
                for b in (entry.bindings if entry else ())
                if b.batch == batch and index_of(b.key) == key_index(req_id, model_id, prefix_id)
            ),
            None,
        )
        if (
            entry is not None
            and binding is not None
            and entry.pool_addrs is not None
            and not self._opts.enable_remote_cache_accessible
        ):
            binding.pulled[lo:hi] = True
            if binding.pulled.all():
                await self._unbind(entry, binding)
        link.channel.ack(msg.rid)

    async def _unbind(self, entry: LocalCache, binding: Binding) -> None:
        """Remove one key binding, tell peers, and free a deallocated cache left unkeyed."""
        self._book.keys.remove(binding)
        if binding in entry.bindings:
            entry.bindings.remove(binding)
        if entry.deallocated and not entry.bindings:
            await self._registrations.retire(entry)
            return
        await self._registrations.republish(entry)
