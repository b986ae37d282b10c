"""The index keys of caches: :class:`CacheKey` (one batch of a contiguous cache),
:class:`CacheKeyByIdAndIndex` (one batch by cache id) and :class:`BlocksCacheKey` (a blocks cache).

The constructors take ``*args, **kwargs`` as the reference does, and validate them once."""

from __future__ import annotations

from typing import Any

from dxl._validate import (
    UINT64_MAX,
    check_int64,
    check_isinstance,
    check_uint32,
    check_uint64,
    ensure,
    uint64,
)

__all__ = ["BlocksCacheKey", "CacheKey", "CacheKeyByIdAndIndex"]


def _take_keyword_args(
    cls_name: str,
    positional_names: tuple[str, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Merge positional args into keywords for the ``*args, **kwargs`` key constructors."""
    limit = len(positional_names)
    ensure(
        len(args) + len(kwargs) <= limit,
        f"{cls_name}: Param num is over limit, got {len(args) + len(kwargs)} (max {limit})",
    )
    params = dict(kwargs)
    for name, value in zip(positional_names, args, strict=False):
        ensure(name not in params, f"{cls_name}: {name} given both by position and by keyword")
        params[name] = value
    ensure(
        "cluster_id" in params or "prompt_cluster_id" in params,
        f"{cls_name}: Param prompt_cluster_id or cluster_id is required",
    )
    ensure(
        not ("cluster_id" in params and "prompt_cluster_id" in params),
        f"{cls_name}: give only one of cluster_id and prompt_cluster_id",
    )
    return params


def _reject_unknown(cls_name: str, params: dict[str, Any], valid: tuple[str, ...]) -> None:
    for key in params:
        ensure(key in valid, f"{cls_name}: Unsupported param: {key}")


class CacheKey:
    """Index key of one batch of a contiguous cache.

    ``CacheKey(cluster_id, req_id, model_id=0, prefix_id=UINT64_MAX)``, positionally or by
    keyword; ``prompt_cluster_id`` is accepted in place of ``cluster_id``.

    Raises:
        LLMException: ``LLM_PARAM_INVALID`` for more than 4 params, a missing cluster id or
            ``req_id``, an unknown keyword, or a parameter given twice.
        TypeError: A value that is not int.
        ValueError: A value that is not uint64.
    """

    __slots__ = ("_cluster_id", "_model_id", "_prefix_id", "_req_id")

    _VALID = ("prompt_cluster_id", "cluster_id", "req_id", "model_id", "prefix_id")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        params = _take_keyword_args(
            "CacheKey", ("cluster_id", "req_id", "model_id", "prefix_id"), args, kwargs
        )
        ensure("req_id" in params, "CacheKey: Param req_id is required")
        _reject_unknown("CacheKey", params, self._VALID)
        cluster_id = params.get("cluster_id", params.get("prompt_cluster_id"))
        req_id = params["req_id"]
        model_id = params.get("model_id", 0)
        prefix_id = params.get("prefix_id", UINT64_MAX)
        self._cluster_id = uint64("cluster_id", cluster_id)
        self._req_id = uint64("req_id", req_id)
        self._model_id = uint64("model_id", model_id)
        self._prefix_id = uint64("prefix_id", prefix_id)

    @property
    def cluster_id(self) -> int:
        """Cluster that owns the cache (used to route a pull; ignored when binding)."""
        return self._cluster_id

    @property
    def prompt_cluster_id(self) -> int:
        """Alias of :attr:`cluster_id`."""
        return self._cluster_id

    @property
    def req_id(self) -> int:
        """Request id; ``UINT64_MAX`` marks an unused batch slot."""
        return self._req_id

    @property
    def model_id(self) -> int:
        """Model id (default 0)."""
        return self._model_id

    @property
    def prefix_id(self) -> int:
        """Prefix id; ``UINT64_MAX`` (the default) means "not a prefix key"."""
        return self._prefix_id

    def _fields(self) -> tuple[int, int, int, int]:
        return (self._cluster_id, self._req_id, self._model_id, self._prefix_id)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CacheKey):
            return self._fields() == other._fields()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("CacheKey", *self._fields()))

    def __repr__(self) -> str:
        return (
            f"CacheKey(cluster_id={self._cluster_id}, req_id={self._req_id}, "
            f"model_id={self._model_id}, prefix_id={self._prefix_id})"
        )


class CacheKeyByIdAndIndex:
    """Addresses batch ``batch_index`` of cache ``cache_id`` on cluster ``cluster_id``.

    Args:
        cluster_id: Owner cluster (uint64).
        cache_id: The owner's cache id (int64).
        batch_index: Batch in that cache (uint32); only 0 is meaningful for blocks caches.

    Raises:
        TypeError: A value that is not int.
        ValueError: A value outside its width.
    """

    __slots__ = ("_batch_index", "_cache_id", "_cluster_id")

    def __init__(self, cluster_id: int, cache_id: int, batch_index: int = 0) -> None:
        check_uint64("cluster_id", cluster_id)
        check_int64("cache_id", cache_id)
        check_uint32("batch_index", batch_index)
        self._cluster_id = cluster_id
        self._cache_id = cache_id
        self._batch_index = batch_index

    @property
    def cluster_id(self) -> int:
        """Owner cluster."""
        return self._cluster_id

    @property
    def cache_id(self) -> int:
        """The owner's cache id."""
        return self._cache_id

    @property
    def batch_index(self) -> int:
        """Batch index in that cache."""
        return self._batch_index

    def _fields(self) -> tuple[int, int, int]:
        return (self._cluster_id, self._cache_id, self._batch_index)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CacheKeyByIdAndIndex):
            return self._fields() == other._fields()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("CacheKeyByIdAndIndex", *self._fields()))

    def __repr__(self) -> str:
        return (
            f"CacheKeyByIdAndIndex(cluster_id={self._cluster_id}, "
            f"cache_id={self._cache_id}, batch_index={self._batch_index})"
        )


class BlocksCacheKey:
    """Index key of a whole blocks cache: ``BlocksCacheKey(cluster_id, model_id=0)``.

    ``prompt_cluster_id`` is accepted in place of ``cluster_id``. As in the reference there
    is no range check, only a type check.

    Raises:
        LLMException: ``LLM_PARAM_INVALID`` for more than 2 params, a missing cluster id,
            an unknown keyword, or a parameter given twice.
        TypeError: A value that is not int ("The first param ..." / "The second param ...").
    """

    __slots__ = ("_cluster_id", "_cluster_id_key", "_model_id")

    _VALID = ("prompt_cluster_id", "cluster_id", "model_id")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        params = _take_keyword_args("BlocksCacheKey", ("cluster_id", "model_id"), args, kwargs)
        _reject_unknown("BlocksCacheKey", params, self._VALID)
        key = "cluster_id" if "cluster_id" in params else "prompt_cluster_id"
        cluster_id = params[key]
        model_id = params.get("model_id", 0)
        check_isinstance("cluster_id", cluster_id, int, allow_none=False, prefix="The first param ")
        check_isinstance("model_id", model_id, int, allow_none=False, prefix="The second param ")
        self._cluster_id: int = cluster_id
        self._cluster_id_key = key
        self._model_id: int = model_id

    @property
    def cluster_id(self) -> int:
        """Cluster that owns the cache (ignored when binding)."""
        return self._cluster_id

    @property
    def prompt_cluster_id(self) -> int:
        """Alias of :attr:`cluster_id`."""
        return self._cluster_id

    @property
    def model_id(self) -> int:
        """Model id; at most one keyed blocks cache per model id per instance."""
        return self._model_id

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BlocksCacheKey):
            return (self._cluster_id, self._model_id) == (other._cluster_id, other._model_id)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("BlocksCacheKey", self._cluster_id, self._model_id))

    def __repr__(self) -> str:
        key = self._cluster_id_key
        return f"BlocksCacheKey({key}={self._cluster_id}, model_id={self._model_id})"
