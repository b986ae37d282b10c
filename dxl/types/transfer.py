"""``transfer_cache_async``: its destinations (:class:`TransferConfig` by address,
:class:`TransferWithCacheKeyConfig` by key), the user's layer hook (:class:`LayerSynchronizer`)
and the task handle with its future (:class:`CacheTask`)."""

from __future__ import annotations

import concurrent.futures
from abc import ABC, abstractmethod
from typing import Any

from dxl._validate import (
    check_isinstance,
    check_layer_range,
    check_uint32,
    check_uint64,
    check_uint64_list,
    ensure,
)
from dxl.errors import LLMException, LLMStatusCode
from dxl.types.keys import BlocksCacheKey, CacheKeyByIdAndIndex

__all__ = ["CacheTask", "LayerSynchronizer", "TransferConfig", "TransferWithCacheKeyConfig"]


class LayerSynchronizer(ABC):
    """User hook that tells ``transfer_cache_async`` when a layer is ready to send."""

    @abstractmethod
    def synchronize_layer(self, layer_index: int, timeout_in_millis: int | None) -> bool:
        """Block until layer ``layer_index`` is computed.

        Called from the transfer thread; ``timeout_in_millis`` is always None.

        Returns:
            True to transfer the layer, False to fail the task.
        """


class TransferConfig:
    """Destination of ``transfer_cache_async`` given by raw addresses.

    Args:
        dst_cluster_id: Peer cluster (uint64).
        dst_addrs: Two addresses per transferred layer, list/tuple of uint64.
        src_layer_range: Source layers, or None for all.
        src_batch_index: Source batch (uint32).

    Raises:
        TypeError: Wrong type (``dst_addrs`` None included).
        ValueError: A value outside its width.
        LLMException: ``LLM_PARAM_INVALID`` for a bad layer range.
    """

    __slots__ = (
        "_dst_addrs",
        "_dst_cluster_id",
        "_src_batch_index",
        "_src_layer_range",
        "dst_layer_range",
    )

    def __init__(
        self,
        dst_cluster_id: int,
        dst_addrs: list[int] | tuple[int, ...],
        src_layer_range: range | None = None,
        src_batch_index: int = 0,
    ) -> None:
        check_uint64("dst_cluster_id", dst_cluster_id)
        self._check_dst_addrs(dst_addrs)
        check_layer_range("src_layer_range", src_layer_range)
        check_uint32("src_batch_index", src_batch_index)
        self._dst_cluster_id = dst_cluster_id
        self._dst_addrs = dst_addrs
        self._src_layer_range = src_layer_range
        self._src_batch_index = src_batch_index
        self.dst_layer_range: range | None = None

    @staticmethod
    def _check_dst_addrs(dst_addrs: Any) -> None:
        check_isinstance("dst_addrs", dst_addrs, (list, tuple), allow_none=False, inner=int)
        check_uint64_list("dst_addrs", dst_addrs)

    @property
    def dst_cluster_id(self) -> int:
        """Peer cluster."""
        return self._dst_cluster_id

    @dst_cluster_id.setter
    def dst_cluster_id(self, value: int) -> None:
        check_uint64("dst_cluster_id", value)
        self._dst_cluster_id = value

    @property
    def dst_addrs(self) -> list[int] | tuple[int, ...]:
        """Destination addresses, two per layer (K, V)."""
        return self._dst_addrs

    @dst_addrs.setter
    def dst_addrs(self, value: list[int] | tuple[int, ...]) -> None:
        self._check_dst_addrs(value)
        self._dst_addrs = value

    @property
    def src_layer_range(self) -> range | None:
        """Source layers; None means all."""
        return self._src_layer_range

    @src_layer_range.setter
    def src_layer_range(self, value: range | None) -> None:
        check_layer_range("src_layer_range", value)
        self._src_layer_range = value

    @property
    def src_batch_index(self) -> int:
        """Source batch index."""
        return self._src_batch_index

    @src_batch_index.setter
    def src_batch_index(self, value: int) -> None:
        check_uint32("src_batch_index", value)
        self._src_batch_index = value

    def __repr__(self) -> str:
        return (
            f"TransferConfig(dst_cluster_id={self._dst_cluster_id}, "
            f"dst_addrs={self._dst_addrs}, src_layer_range={self._src_layer_range}, "
            f"src_batch_index={self._src_batch_index})"
        )


class TransferWithCacheKeyConfig:
    """Destination of ``transfer_cache_async`` given by key (remote-accessible mode).

    Args:
        cache_key: Destination cache key.
        src_layer_range: Source layers (required).
        dst_layer_range: Destination layers (required), same length.
        src_batch_index: Source batch (uint32); must be 0 with a ``BlocksCacheKey``.

    Raises:
        TypeError: Wrong type, or None for a required argument.
        ValueError: ``src_batch_index`` not uint32.
        LLMException: ``LLM_PARAM_INVALID`` for a bad range, unequal range lengths, or a
            non-zero ``src_batch_index`` with a ``BlocksCacheKey``.
    """

    __slots__ = ("_cache_key", "_dst_layer_range", "_src_batch_index", "_src_layer_range")

    def __init__(
        self,
        cache_key: BlocksCacheKey | CacheKeyByIdAndIndex,
        src_layer_range: range | None = None,
        dst_layer_range: range | None = None,
        src_batch_index: int = 0,
    ) -> None:
        check_isinstance(
            "cache_key", cache_key, (BlocksCacheKey, CacheKeyByIdAndIndex), allow_none=False
        )
        check_layer_range("src_layer_range", src_layer_range, allow_none=False)
        check_layer_range("dst_layer_range", dst_layer_range, allow_none=False)
        ensure(
            len(src_layer_range) == len(dst_layer_range),  # type: ignore[arg-type]
            f"TransferWithCacheKeyConfig: src_layer_range {src_layer_range} and "
            f"dst_layer_range {dst_layer_range} must have the same length",
        )
        check_uint32("src_batch_index", src_batch_index)
        self._check_blocks_batch(cache_key, src_batch_index)
        self._cache_key = cache_key
        self._src_layer_range: range = src_layer_range  # type: ignore[assignment]
        self._dst_layer_range: range = dst_layer_range  # type: ignore[assignment]
        self._src_batch_index = src_batch_index

    @staticmethod
    def _check_blocks_batch(cache_key: Any, src_batch_index: int) -> None:
        ensure(
            not (isinstance(cache_key, BlocksCacheKey) and src_batch_index != 0),
            f"TransferWithCacheKeyConfig: src_batch_index must be 0 when cache_key is a "
            f"BlocksCacheKey, got {src_batch_index}",
        )

    @property
    def cache_key(self) -> BlocksCacheKey | CacheKeyByIdAndIndex:
        """Destination cache key."""
        return self._cache_key

    @cache_key.setter
    def cache_key(self, value: BlocksCacheKey | CacheKeyByIdAndIndex) -> None:
        check_isinstance(
            "cache_key", value, (BlocksCacheKey, CacheKeyByIdAndIndex), allow_none=False
        )
        self._check_blocks_batch(value, self._src_batch_index)
        self._cache_key = value

    @property
    def dst_cluster_id(self) -> int:
        """``cache_key.cluster_id`` (follows the key when it is replaced)."""
        return self._cache_key.cluster_id

    @property
    def src_layer_range(self) -> range:
        """Source layers."""
        return self._src_layer_range

    @src_layer_range.setter
    def src_layer_range(self, value: range) -> None:
        check_layer_range("src_layer_range", value, allow_none=False)
        self._src_layer_range = value

    @property
    def dst_layer_range(self) -> range:
        """Destination layers."""
        return self._dst_layer_range

    @dst_layer_range.setter
    def dst_layer_range(self, value: range) -> None:
        check_layer_range("dst_layer_range", value, allow_none=False)
        self._dst_layer_range = value

    @property
    def src_batch_index(self) -> int:
        """Source batch index."""
        return self._src_batch_index

    @src_batch_index.setter
    def src_batch_index(self, value: int) -> None:
        check_uint32("src_batch_index", value)
        self._check_blocks_batch(self._cache_key, value)
        self._src_batch_index = value

    def __repr__(self) -> str:
        return (
            f"TransferWithCacheKeyConfig(cache_key={self._cache_key}, "
            f"src_layer_range={self._src_layer_range}, "
            f"dst_layer_range={self._dst_layer_range}, "
            f"src_batch_index={self._src_batch_index})"
        )


class CacheTask:
    """Handle of a ``transfer_cache_async`` task; built by the cache manager.

    Args:
        num_configs: Number of transfer configs of the task.
        future: Resolves to one ``LLMStatusCode`` or None per config, in input order.
    """

    __slots__ = ("_future", "_num_configs")

    def __init__(self, num_configs: int, future: concurrent.futures.Future[Any]) -> None:
        self._num_configs = num_configs
        self._future = future

    def _wait(
        self, timeout_in_millis: int | None
    ) -> tuple[list[LLMStatusCode | None] | None, LLMStatusCode]:
        """Return ``(results, code)``: results if the task finished normally, else None."""
        if timeout_in_millis is not None:
            check_uint32("timeout_in_millis", timeout_in_millis)
        timeout = None if timeout_in_millis is None else timeout_in_millis / 1000
        # Future.exception(), not futures.wait(): wait() never returns for a future that was
        # cancelled without set_running_or_notify_cancel(). Its own TimeoutError is raised,
        # while a TimeoutError the task failed with is returned, so the two stay apart.
        try:
            exc = self._future.exception(timeout=timeout)
        except concurrent.futures.CancelledError:
            return None, LLMStatusCode.LLM_FAILED
        except TimeoutError:
            return None, LLMStatusCode.LLM_TIMEOUT
        if isinstance(exc, LLMException):
            return None, exc.status_code
        if exc is not None:
            return None, LLMStatusCode.LLM_FAILED
        return list(self._future.result()), LLMStatusCode.LLM_SUCCESS

    async def wait_async(self) -> list[LLMStatusCode | None]:
        """Await the whole task from a coroutine (the async Engine's way; the blocking
        methods would stall the loop the task runs on) and return :meth:`get_results`."""
        import asyncio
        import contextlib

        with contextlib.suppress(Exception):  # a failed task is reported by get_results
            await asyncio.shield(asyncio.wrap_future(self._future))
        return self.get_results(0)

    def synchronize(self, timeout_in_millis: int | None = None) -> LLMStatusCode:
        """Wait for the whole task.

        Args:
            timeout_in_millis: None waits forever; otherwise a uint32 number of ms.

        Returns:
            ``LLM_TIMEOUT`` if still running after the timeout; the status of a failed
            task (``LLM_FAILED`` for an unexpected error); else the first recorded
            non-success result; else ``LLM_SUCCESS``.

        Raises:
            TypeError: ``timeout_in_millis`` not int.
            ValueError: ``timeout_in_millis`` not uint32.
        """
        results, code = self._wait(timeout_in_millis)
        if results is None:
            return code
        for result in results:
            if result is not None and result != LLMStatusCode.LLM_SUCCESS:
                return result
        return LLMStatusCode.LLM_SUCCESS

    def get_results(self, timeout_in_millis: int | None = None) -> list[LLMStatusCode | None]:
        """Return one result per transfer config, in input order.

        An entry is None if no layer of that config was transferred. If the task did not
        finish in time every entry is ``LLM_TIMEOUT``; if it failed as a whole every entry
        is its status.

        Raises:
            TypeError: ``timeout_in_millis`` not int.
            ValueError: ``timeout_in_millis`` not uint32.
        """
        results, code = self._wait(timeout_in_millis)
        if results is None:
            return [code] * self._num_configs
        return results

    def __repr__(self) -> str:
        return f"CacheTask(num_configs={self._num_configs}, done={self._future.done()})"
