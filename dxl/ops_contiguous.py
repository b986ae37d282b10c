"""Operations on contiguous caches and CacheKeys: pull_cache, push_cache, contiguous -> blocks
pulls, key removal and key consumption (a mixin of :class:`dxl.engine.Engine`).

A contiguous cache has ``B = shape[0]`` batches per tensor, batch ``b`` of tensor ``t`` being
``[b * S, (b + 1) * S)`` from ``addrs[t]`` with stride ``S = tensor_size / B``.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from . import args
from ._validate import check_int64, check_isinstance, check_uint32
from .errors import LLMException, LLMStatusCode
from .keys import Binding, check_cache_key, index_of, is_valid_id, key_index
from .plan import offset_pieces
from .types import Cache, CacheKey, CacheKeyByIdAndIndex

if TYPE_CHECKING:
    from .link import Link
    from .registry import LocalCache, RemoteCache

log = logging.getLogger("dxl")
Status = LLMStatusCode


class ContiguousOps:
    """pull_cache / push_cache / CacheKey handling; relies on the Engine core's helpers."""

    # ------------------------------------------------------------------ public operations
    async def pull_cache(
        self,
        cache_key: CacheKey | CacheKeyByIdAndIndex,
        cache: Cache,
        batch_index: int = 0,
        size: int = -1,
        **kwargs: Any,
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
        check_isinstance("cache_key", cache_key, key_types, allow_none=False)
        args.check_cache_arg(op, "cache", cache)
        check_uint32("batch_index", batch_index)
        check_int64("size", size)
        if cache.is_blocks_cache:
            raise args.param_invalid(op, "cache must be a contiguous cache, not a blocks cache")
        if size != -1 and size <= 0:
            raise args.param_invalid(op, f"size must be -1 or > 0, got {size}")
        src_range, dst_range, tnpl = args.layer_kwargs(op, kwargs)
        args.check_tensor_num_per_layer(op, tnpl)
        args.check_ranges(op, src_range, dst_range)
        if isinstance(cache_key, CacheKey):
            check_cache_key(op, cache_key)
        self._require_running(op)
        link = self._link_for(op, cache_key.cluster_id)
        local = self._local_for(op, cache)
        remote, rbatch, bound = self._remote_batch(op, link, cache_key)
        l_stride, r_stride = local.layout.unit_bytes, remote.layout.unit_bytes
        if batch_index >= local.layout.units:
            raise args.param_invalid(
                op, f"batch_index {batch_index} >= the {local.layout.units} batches of cache"
            )
        nbytes = l_stride if size == -1 else size
        if nbytes > l_stride or nbytes > r_stride:
            raise args.param_invalid(
                op,
                f"size {nbytes} exceeds the local stride {l_stride} or the remote stride "
                f"{r_stride}",
            )
        dst_bases, src_bases = self._select(
            op, local.layout, remote.layout, dst_range, src_range, tnpl, "dst", "src"
        )
        plan = functools.partial(
            offset_pieces,
            dst_bases,
            src_bases,
            np.array([batch_index * l_stride], dtype=np.uint64),
            np.array([rbatch * r_stride], dtype=np.uint64),
            nbytes,
        )
        await self._transfer(op, link, local, remote, plan, write=False)
        await self._after_keyed_pull(link, remote, bound, src_range, tnpl)

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
        check_isinstance("dst_cache_key", dst_cache_key, CacheKeyByIdAndIndex, allow_none=False)
        args.check_cache_arg(op, "src_cache", src_cache)
        if src_cache.is_blocks_cache:
            raise args.param_invalid(op, "src_cache must be a contiguous cache")
        check_uint32("src_batch_index", src_batch_index)
        args.check_tensor_num_per_layer(op, tensor_num_per_layer)
        args.check_ranges(op, src_layer_range, dst_layer_range)
        check_int64("size", size)
        if size != -1:
            raise args.param_invalid(op, f"size must be -1 (the whole batch), got {size}")
        self._require_running(op)
        link = self._link_for(op, dst_cache_key.cluster_id)
        local = self._local_for(op, src_cache)
        remote, rbatch, _ = self._remote_batch(op, link, dst_cache_key)
        l_stride, r_stride = local.layout.unit_bytes, remote.layout.unit_bytes
        if src_batch_index >= local.layout.units:
            raise args.param_invalid(
                op,
                f"src_batch_index {src_batch_index} >= the {local.layout.units} batches of "
                "src_cache",
            )
        if l_stride > r_stride:
            raise args.param_invalid(
                op, f"a local batch ({l_stride} bytes) does not fit a remote batch ({r_stride})"
            )
        src_bases, dst_bases = self._select(
            op,
            local.layout,
            remote.layout,
            src_layer_range,
            dst_layer_range,
            tensor_num_per_layer,
            "src",
            "dst",
        )
        plan = functools.partial(
            offset_pieces,
            dst_bases,
            src_bases,
            np.array([rbatch * r_stride], dtype=np.uint64),
            np.array([src_batch_index * l_stride], dtype=np.uint64),
            l_stride,
        )
        await self._transfer(op, link, local, remote, plan, write=True)

    async def _pull_contiguous_to_blocks(
        self,
        op: str,
        key: CacheKey | CacheKeyByIdAndIndex,
        dst_cache: Cache,
        dst: np.ndarray,
        src_range: range | None,
        dst_range: range | None,
        tnpl: int,
    ) -> None:
        """pull_blocks from a contiguous source: chunk i of the remote batch (local block
        size) lands in local block ``dst[i]``."""
        if isinstance(key, CacheKey):
            check_cache_key(op, key)
        self._require_running(op)
        link = self._link_for(op, key.cluster_id)
        local = self._local_for(op, dst_cache)
        remote, rbatch, bound = self._remote_batch(op, link, key)
        bb = local.layout.unit_bytes
        args.check_blocks_in_range(op, "dst_blocks", dst, local.layout.units)
        if dst.size * bb > remote.layout.unit_bytes:
            raise args.param_invalid(
                op,
                f"{dst.size} blocks of {bb} bytes exceed the remote batch of "
                f"{remote.layout.unit_bytes} bytes",
            )
        dst_bases, src_bases = self._select(
            op, local.layout, remote.layout, dst_range, src_range, tnpl, "dst", "src"
        )
        chunks = np.arange(dst.size, dtype=np.uint64) * np.uint64(bb)
        src_off = np.uint64(rbatch * remote.layout.unit_bytes) + chunks
        plan = functools.partial(
            offset_pieces, dst_bases, src_bases, dst.astype(np.uint64) * np.uint64(bb), src_off, bb
        )
        await self._transfer(op, link, local, remote, plan, write=False)
        await self._after_keyed_pull(link, remote, bound, src_range, tnpl)

    async def remove_cache_key(self, cache_key: CacheKey) -> None:
        """Unbind a key on this (owner) side; later pulls by it fail. Unknown keys and keys
        of registered (user-memory) caches are left alone."""
        check_isinstance("cache_key", cache_key, CacheKey, allow_none=False)
        self._require_running("remove_cache_key")
        binding = self._keys.get(cache_key)
        if binding is None:
            return
        entry = self._caches.get(binding.cache_id)
        if entry is None or entry.pool_addrs is None:
            return
        await self._unbind(entry, binding)

    @staticmethod
    def check_cache_key(cache_key: CacheKey) -> None:
        """Raise LLMException(LLM_PARAM_INVALID) unless exactly one of req_id/prefix_id is set."""
        check_isinstance("cache_key", cache_key, CacheKey, allow_none=False)
        check_cache_key("check_cache_key", cache_key)

    # ------------------------------------------------------------------ helpers
    def _remote_batch(
        self, op: str, link: Link, key: CacheKey | CacheKeyByIdAndIndex
    ) -> tuple[RemoteCache, int, list[int] | None]:
        """The peer's contiguous cache and batch a key names, and the bound key to consume."""
        peer = link.peer.cluster_id
        if isinstance(key, CacheKeyByIdAndIndex):
            remote = link.registry.caches.get(key.cache_id)
            if remote is None or remote.layout.blocks:
                raise args.fail(
                    op,
                    Status.LLM_KV_CACHE_NOT_EXIST,
                    f"cluster {peer} has no remotely accessible contiguous cache "
                    f"{key.cache_id}; the owner must register it with remote_accessible=True",
                )
            if key.batch_index >= remote.layout.units:
                raise args.fail(
                    op,
                    Status.LLM_KV_CACHE_NOT_EXIST,
                    f"cache {key.cache_id} of cluster {peer} has {remote.layout.units} batches, "
                    f"not {key.batch_index + 1}",
                )
            bound = next(
                (k for k in remote.keys if k[3] == key.batch_index and not is_valid_id(k[2])),
                None,
            )
            return remote, key.batch_index, bound
        found = link.registry.by_key.get(index_of(key))
        if found is None:
            raise args.fail(
                op,
                Status.LLM_KV_CACHE_NOT_EXIST,
                f"cluster {peer} has no remotely accessible cache bound to {key!r}",
            )
        remote, batch = found
        bound = (
            None
            if is_valid_id(key.prefix_id)
            else [key.req_id, key.model_id, key.prefix_id, batch]
        )
        return remote, batch, bound

    async def _after_keyed_pull(
        self,
        link: Link,
        remote: RemoteCache,
        bound: list[int] | None,
        src_range: range | None,
        tnpl: int,
    ) -> None:
        """Tell the owner a keyed batch was pulled, so it can consume the key (it decides:
        only allocated caches, and only without remote-cache-accessible mode)."""
        if bound is None:
            return
        if src_range is None:
            tensors = [0, remote.layout.num_tensors]
        else:
            tensors = [src_range.start * tnpl, src_range.stop * tnpl]
        try:
            await link.channel.request(
                "consume",
                self._opts.sync_kv_timeout_ms / 1000,
                id=remote.cache_id,
                key=bound,
                tensors=tensors,
            )
        except LLMException as exc:  # the data arrived; only the owner's bookkeeping lags
            log.warning("dxl: cluster %d did not confirm key consumption: %s",
                        link.peer.cluster_id, exc)

    async def _on_consume(self, link: Link, msg: dict[str, Any]) -> None:
        """Owner side of a keyed pull: mark the pulled tensors; a fully pulled key of an
        allocated cache is unbound (and the cache freed if it was deallocated)."""
        req_id, model_id, prefix_id, batch = msg["key"]
        lo, hi = msg["tensors"]
        entry = self._caches.get(msg["id"])
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
        link.channel.ack(msg["rid"])

    async def _unbind(self, entry: LocalCache, binding: Binding) -> None:
        """Remove one key binding, tell peers, and free a deallocated cache left unkeyed."""
        self._keys.remove(binding)
        if binding in entry.bindings:
            entry.bindings.remove(binding)
        if entry.deallocated and not entry.bindings:
            await self._retire(entry)
            return
        await self._republish(entry)
