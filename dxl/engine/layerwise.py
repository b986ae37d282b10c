"""Layer-wise asynchronous push, ``transfer_cache_async``.

The task runs on the engine's loop while the model computes: for each layer it waits (on a
worker thread) for the user's ``LayerSynchronizer`` to release that layer, then pushes that
layer to every destination that covers it, one native call per destination and layer. The
caller gets a :class:`CacheTask` at once; the model's forward pass awaits nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass

import numpy as np

from .._validate import check_blocks_in_range, check_isinstance, check_uint64, check_uint64_list
from ..errors import LLMException, LLMStatusCode, fail, param_invalid
from ..memory.plan import Pieces, coalesce, offset_pieces
from ..types import (
    BlocksCacheKey,
    Cache,
    CacheKeyByIdAndIndex,
    CacheTask,
    LayerSynchronizer,
    TransferConfig,
    TransferWithCacheKeyConfig,
)
from .link import Link
from .links import LinkTable
from .mover import Mover
from .registry import LocalCache, RemoteCache
from .resolve import Resolver, Route
from .state import RunState
from .transfer import Planned, Transfer

log = logging.getLogger("dxl")
TENSORS_PER_LAYER = 2  # the reference fixes K and V per layer for this operation


@dataclass(slots=True)
class _Dest:
    """One transfer config, resolved: where each of its layers goes."""

    config: TransferConfig | TransferWithCacheKeyConfig
    src_layers: range


class LayerwiseOps:
    """transfer_cache_async: a background task per call, pushing layers as they are ready."""

    def __init__(self, state: RunState, resolver: Resolver, links: LinkTable, mover: Mover) -> None:
        self._state = state
        self._resolver = resolver
        self._links = links
        self._mover = mover

    async def transfer_cache_async(
        self,
        src_cache: Cache,
        layer_synchronizer: LayerSynchronizer,
        transfer_configs: list[TransferConfig | TransferWithCacheKeyConfig]
        | tuple[TransferConfig | TransferWithCacheKeyConfig, ...],
        src_block_indices: list[int] | tuple[int, ...] | None = None,
        dst_block_indices: list[int] | tuple[int, ...] | None = None,
        dst_block_memory_size: int | None = None,
    ) -> CacheTask:
        """Push ``src_cache`` layer by layer as the model finishes each layer.

        Returns at once with a :class:`CacheTask`; ``task.synchronize()`` /
        ``task.get_results()`` (blocking, for other threads) or ``await task.wait_async()``
        give one status per config. Both config kinds work in both modes (dxl stance 3).
        """
        op = "transfer_cache_async"
        if src_cache is None:
            raise TypeError(f"{op}: src_cache must be a Cache, got None")
        check_isinstance("src_cache", src_cache, Cache)
        for name, value in (
            ("src_block_indices", src_block_indices),
            ("dst_block_indices", dst_block_indices),
        ):
            check_isinstance(name, value, (list, tuple))
            if value is not None:
                check_uint64_list(name, value)
        if dst_block_memory_size is not None:
            check_uint64("dst_block_memory_size", dst_block_memory_size)
        src_blocks = list(src_block_indices or ())
        dst_blocks = list(dst_block_indices or ())
        if src_blocks and len(dst_blocks) != len(src_blocks):
            raise param_invalid(
                op, "dst_block_indices must be given, with one entry per src_block_indices entry"
            )
        if not src_blocks and dst_blocks and not dst_block_memory_size:
            raise param_invalid(
                op, "dst_block_memory_size is required for a contiguous source into blocks"
            )
        if layer_synchronizer is None:
            raise TypeError(f"{op}: layer_synchronizer must be a LayerSynchronizer, got None")
        check_isinstance("layer_synchronizer", layer_synchronizer, LayerSynchronizer)
        check_isinstance(
            "transfer_configs",
            transfer_configs,
            (list, tuple),
            allow_none=False,
            inner=(TransferConfig, TransferWithCacheKeyConfig),
        )
        if dst_block_memory_size and not dst_blocks:
            raise param_invalid(op, "dst_block_memory_size applies only with dst_block_indices")
        self._state.require(op)
        local = self._resolver.local(op, src_cache)
        if local.layout.num_tensors % TENSORS_PER_LAYER:
            raise param_invalid(
                op,
                f"src_cache has {local.layout.num_tensors} tensors; K,V layers need an even count",
            )
        if src_blocks and not local.layout.blocks:
            raise param_invalid(op, "src_block_indices needs a blocks src_cache")
        num_layers = local.layout.num_tensors // TENSORS_PER_LAYER
        src_arr = np.asarray(src_blocks, dtype=np.int64)
        dst_arr = np.asarray(dst_blocks, dtype=np.int64)
        if local.layout.blocks:
            check_blocks_in_range(op, "src_block_indices", src_arr, local.layout.units)
        dests = [self._layerwise_dest(op, cfg, num_layers, local) for cfg in transfer_configs]
        future: concurrent.futures.Future[list[LLMStatusCode | None]] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        self._links.spawn(
            self._run_layerwise(
                local,
                layer_synchronizer,
                dests,
                src_arr,
                dst_arr,
                dst_block_memory_size or 0,
                future,
            )
        )
        return CacheTask(len(dests), future)

    def _layerwise_dest(
        self,
        op: str,
        cfg: TransferConfig | TransferWithCacheKeyConfig,
        num_layers: int,
        local: LocalCache,
    ) -> _Dest:
        src_range = cfg.src_layer_range if cfg.src_layer_range is not None else range(num_layers)
        if src_range.stop > num_layers:
            raise param_invalid(
                op, f"src_layer_range {src_range} exceeds the {num_layers} layers of src_cache"
            )
        if local.layout.blocks and cfg.src_batch_index != 0:
            raise param_invalid(op, "src_batch_index must be 0 for a blocks src_cache")
        if not local.layout.blocks and cfg.src_batch_index >= local.layout.units:
            raise param_invalid(
                op, f"src_batch_index {cfg.src_batch_index} >= {local.layout.units} batches"
            )
        want = TENSORS_PER_LAYER * len(src_range)
        if isinstance(cfg, TransferConfig) and len(cfg.dst_addrs) != want:
            raise param_invalid(
                op,
                f"TransferConfig.dst_addrs needs {want} addresses (K and V of each layer), "
                f"got {len(cfg.dst_addrs)}",
            )
        return _Dest(cfg, src_range)

    async def _run_layerwise(
        self,
        local: LocalCache,
        synchronizer: LayerSynchronizer,
        dests: list[_Dest],
        src_blocks: np.ndarray,
        dst_blocks: np.ndarray,
        dst_block_bytes: int,
        future: concurrent.futures.Future[list[LLMStatusCode | None]],
    ) -> None:
        """Layer by layer: wait for the synchronizer, push to every covering destination.
        A config records SUCCESS after its last layer; the first failure ends the task."""
        results: list[LLMStatusCode | None] = [None] * len(dests)
        try:
            for layer in range(local.layout.num_tensors // TENSORS_PER_LAYER):
                covering = [i for i, d in enumerate(dests) if layer in d.src_layers]
                if not covering:
                    continue
                # user code that blocks until the model finished the layer: not on the loop
                ready = await asyncio.to_thread(synchronizer.synchronize_layer, layer, None)
                if not ready:
                    for i in covering:
                        results[i] = LLMStatusCode.LLM_PARAM_INVALID
                    return
                for i in covering:
                    code = await self._push_layer(
                        local, dests[i], layer, src_blocks, dst_blocks, dst_block_bytes
                    )
                    if code != LLMStatusCode.LLM_SUCCESS:
                        results[i] = code
                        return
                    if layer == dests[i].src_layers[-1]:
                        results[i] = LLMStatusCode.LLM_SUCCESS
        except Exception as exc:  # a synchronizer bug fails the task, not the engine
            log.exception("dxl: transfer_cache_async task failed")
            future.set_exception(exc)
        finally:
            if not future.done():
                future.set_result(results)

    async def _push_layer(
        self,
        local: LocalCache,
        dest: _Dest,
        layer: int,
        src_blocks: np.ndarray,
        dst_blocks: np.ndarray,
        dst_block_bytes: int,
    ) -> LLMStatusCode:
        """Push one layer (K and V) to one destination; failures become a status code."""
        op = "transfer_cache_async"
        cfg = dest.config
        k = layer - dest.src_layers.start
        src_bases = local.layout.addrs[layer * TENSORS_PER_LAYER : (layer + 1) * TENSORS_PER_LAYER]
        try:
            link = self._links.route(op, cfg.dst_cluster_id)
            if isinstance(cfg, TransferConfig):
                dst_bases = np.asarray(cfg.dst_addrs[2 * k : 2 * k + 2], dtype=np.uint64)
            else:
                remote, rbatch = self._layerwise_remote(op, link, cfg.cache_key)
                dst_layer = cfg.dst_layer_range[k]
                if (dst_layer + 1) * TENSORS_PER_LAYER > remote.layout.num_tensors:
                    raise param_invalid(
                        op, f"dst layer {dst_layer} is beyond the destination cache's layers"
                    )
                lo = dst_layer * TENSORS_PER_LAYER
                dst_bases = remote.layout.addrs[lo : lo + TENSORS_PER_LAYER].copy()
                if remote.layout.blocks:
                    dst_block_bytes = dst_block_bytes or remote.layout.unit_bytes
                else:
                    dst_bases += np.uint64(rbatch * remote.layout.unit_bytes)
            pieces = self._layer_pieces(
                op, local, cfg, src_bases, src_blocks, dst_bases, dst_blocks, dst_block_bytes
            )
            # every destination piece must lie in memory the peer opened to us
            holders = [
                link.registry.find(int(a), int(n))
                for a, n in zip(pieces.dst, pieces.length, strict=True)
            ]
            if any(h is None for h in holders):
                raise fail(
                    op,
                    LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                    "the destination must lie inside caches the peer registered with "
                    "remote_accessible=True",
                )
            remotes = list({id(h): h for h in holders}.values())
            route = Route(link, local, [h for h in remotes if h is not None])
            await self._mover.move(Transfer(op, route, Planned(pieces), write=True))
        except LLMException as exc:
            log.error("dxl: %s layer %d: %s", op, layer, exc)
            return exc.status_code
        return LLMStatusCode.LLM_SUCCESS

    @staticmethod
    def _layer_pieces(
        op: str,
        local: LocalCache,
        cfg: TransferConfig | TransferWithCacheKeyConfig,
        src_bases: np.ndarray,
        src_blocks: np.ndarray,
        dst_bases: np.ndarray,
        dst_blocks: np.ndarray,
        dst_block_bytes: int,
    ) -> Pieces:
        """The pieces of one layer: blocks -> blocks, or one source unit (a contiguous
        cache's batch ``src_batch_index``; without block indices, a blocks cache's block 0, as
        the reference's cache entry for a blocks cache is one block wide) -> destination blocks
        or the destination's start (its batch, for a contiguous destination key)."""
        src_unit = local.layout.unit_bytes
        if local.layout.blocks and src_blocks.size:  # blocks -> blocks
            if dst_block_bytes and dst_block_bytes < src_unit:
                raise param_invalid(op, "destination blocks are smaller than source blocks")
            return offset_pieces(
                dst_bases,
                src_bases,
                dst_blocks.astype(np.uint64) * np.uint64(dst_block_bytes or src_unit),
                src_blocks.astype(np.uint64) * np.uint64(src_unit),
                src_unit,
            )
        batch_off = cfg.src_batch_index * src_unit
        if dst_blocks.size:  # contiguous -> blocks: chunks of the batch
            if dst_blocks.size * dst_block_bytes > src_unit:
                raise param_invalid(op, "dst_block_indices cover more than one batch")
            chunks = np.arange(dst_blocks.size, dtype=np.uint64) * np.uint64(dst_block_bytes)
            return offset_pieces(
                dst_bases,
                src_bases,
                dst_blocks.astype(np.uint64) * np.uint64(dst_block_bytes),
                np.uint64(batch_off) + chunks,
                dst_block_bytes,
            )
        src = src_bases.astype(np.uint64) + np.uint64(batch_off)
        return coalesce(
            dst_bases.astype(np.uint64), src, np.full(src.size, src_unit, dtype=np.uint64)
        )

    @staticmethod
    def _layerwise_remote(
        op: str, link: Link, key: BlocksCacheKey | CacheKeyByIdAndIndex
    ) -> tuple[RemoteCache, int]:
        if isinstance(key, BlocksCacheKey):
            return Resolver.remote_blocks(op, link, key), 0
        remote, batch, _ = Resolver.remote_batch(op, link, key)
        return remote, batch
