"""Public data types of the LLM-DataDist v2 API (spec sections 2 and 4).

User input is validated here, once, with the reference's exception conventions
(see :mod:`dxl._validate`). The engine may trust what these constructors accept.
"""

from __future__ import annotations

import concurrent.futures
import math
import socket
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any

from dxl._validate import (
    INT64_MAX,
    UINT64_MAX,
    check_int32,
    check_int64,
    check_int64_list,
    check_isinstance,
    check_layer_range,
    check_uint16,
    check_uint32,
    check_uint64,
    check_uint64_list,
    ensure,
    uint64,
)
from dxl.errors import LLMException, LLMStatusCode, _NamedIntEnum, param_invalid

__all__ = [
    "MAX_SHAPE_RANK",
    "UINT64_MAX",
    "BlocksCacheKey",
    "Cache",
    "CacheDesc",
    "CacheKey",
    "CacheKeyByIdAndIndex",
    "CacheTask",
    "DataType",
    "LLMClusterInfo",
    "LLMRole",
    "LayerSynchronizer",
    "MemInfo",
    "Memtype",
    "Placement",
    "RegisterMemStatus",
    "TransferConfig",
    "TransferWithCacheKeyConfig",
]

MAX_SHAPE_RANK = 32
"""Largest tensor rank the engine accepts (spec section 11)."""


# --------------------------------------------------------------------------------------------
# Enums


class LLMRole(_NamedIntEnum):
    """Role label of an instance; in v2 it does not restrict any operation."""

    PROMPT = 1
    DECODER = 2
    MIX = 3


class Placement(_NamedIntEnum):
    """Where a cache lives: HOST memory or DEVICE (CUDA) memory."""

    HOST = 0
    DEVICE = 1


_ITEMSIZE: dict[int, int] = {
    0: 4,
    1: 2,
    2: 1,
    3: 4,
    4: 1,
    6: 2,
    7: 2,
    8: 4,
    9: 8,
    10: 8,
    11: 8,
    12: 1,
    27: 2,
}


class DataType(Enum):
    """Element type of a cache tensor; values are the GE ``ge::DataType`` numbers."""

    DT_FLOAT = 0
    DT_FLOAT16 = 1
    DT_INT8 = 2
    DT_INT32 = 3
    DT_UINT8 = 4
    DT_INT16 = 6
    DT_UINT16 = 7
    DT_UINT32 = 8
    DT_INT64 = 9
    DT_UINT64 = 10
    DT_DOUBLE = 11
    DT_BOOL = 12
    DT_STRING = 13
    DT_BF16 = 27

    @property
    def itemsize(self) -> int:
        """Bytes per element.

        Raises:
            LLMException: ``LLM_PARAM_INVALID`` for ``DT_STRING``, which has no fixed size.
        """
        size = _ITEMSIZE.get(self.value)
        if size is None:
            raise param_invalid(None, f"data_type {self} has no fixed itemsize")
        return size


class RegisterMemStatus(Enum):
    """State of the memory exchange of a ``link()`` communication domain."""

    OK = 0
    PREPARING = 1
    FAILED = 2


class Memtype(Enum):
    """Memory kind of a :class:`MemInfo`."""

    MEM_TYPE_DEVICE = 0
    MEM_TYPE_HOST = 1


# --------------------------------------------------------------------------------------------
# Cache description and keys


class CacheDesc:
    """Shape of a cache: ``num_tensors`` equally shaped tensors.

    Args:
        num_tensors: Number of tensors (uint32; 0 is accepted here, rejected on allocate).
        shape: Shape of each tensor, a list or tuple of int; kept as the object given.
        data_type: Element type.
        placement: HOST or DEVICE memory.
        batch_dim_index: Index of the batch dimension in ``shape``.
        seq_len_dim_index: Index of the sequence dimension, or -1.
        kv_tensor_format: Optional format label.

    Raises:
        TypeError: Wrong argument type.
        ValueError: ``num_tensors`` not uint32, ``seq_len_dim_index`` not int32, or a
            dimension not int64.
        LLMException: ``LLM_PARAM_INVALID`` for an index out of range or a rank outside
            ``[1, 32]``.
    """

    __slots__ = (
        "_batch_dim",
        "_data_type",
        "_kv_tensor_format",
        "_num_tensors",
        "_placement",
        "_seq_len_dim_index",
        "_shape",
        "_size",
    )

    def __init__(
        self,
        num_tensors: int,
        shape: tuple[int, ...] | list[int],
        data_type: DataType,
        placement: Placement = Placement.DEVICE,
        batch_dim_index: int = 0,
        seq_len_dim_index: int = -1,
        kv_tensor_format: str | None = None,
    ) -> None:
        # Same order as the reference, so the same bad input raises the same error.
        check_uint32("num_tensors", num_tensors)
        check_isinstance("shape", shape, (tuple, list), allow_none=False, inner=int)
        check_isinstance("data_type", data_type, DataType, allow_none=False)
        check_isinstance("placement", placement, Placement, allow_none=False)
        check_isinstance("batch_dim_index", batch_dim_index, int, allow_none=False)
        check_int32("seq_len_dim_index", seq_len_dim_index)
        check_isinstance("kv_tensor_format", kv_tensor_format, str)
        ensure(
            0 <= batch_dim_index < len(shape),
            f"CacheDesc: batch_dim_index {batch_dim_index} out of range [0, {len(shape)})",
        )
        ensure(
            seq_len_dim_index == -1 or 0 <= seq_len_dim_index < len(shape),
            f"CacheDesc: seq_len_dim_index {seq_len_dim_index} must be -1 or in [0, {len(shape)})",
        )
        check_int64_list("shape", shape)
        ensure(
            len(shape) <= MAX_SHAPE_RANK,
            f"CacheDesc: len(shape) must be in [1, {MAX_SHAPE_RANK}], got {len(shape)}",
        )
        self._num_tensors = num_tensors
        self._shape = shape
        self._data_type = data_type
        self._placement = placement
        self._batch_dim = batch_dim_index
        self._seq_len_dim_index = seq_len_dim_index
        self._kv_tensor_format = kv_tensor_format
        self._size = -1

    @property
    def num_tensors(self) -> int:
        """Number of tensors in the cache."""
        return self._num_tensors

    @property
    def shape(self) -> tuple[int, ...] | list[int]:
        """Shape of each tensor (the object given to the constructor)."""
        return self._shape

    @property
    def data_type(self) -> DataType:
        """Element type."""
        return self._data_type

    @property
    def placement(self) -> Placement:
        """HOST or DEVICE."""
        return self._placement

    @property
    def batch_dim(self) -> int:
        """The ``batch_dim_index`` given to the constructor."""
        return self._batch_dim

    @property
    def batch_size(self) -> int:
        """``shape[batch_dim_index]`` (the engine itself always uses ``shape[0]``)."""
        return self._shape[self._batch_dim]

    @property
    def seq_len_dim_index(self) -> int:
        """Index of the sequence dimension, or -1."""
        return self._seq_len_dim_index

    @property
    def kv_tensor_format(self) -> str | None:
        """Optional format label."""
        return self._kv_tensor_format

    @property
    def size(self) -> int:
        """Bytes of ONE tensor, ``prod(shape) * itemsize``; computed on first use.

        Raises:
            LLMException: ``LLM_PARAM_INVALID`` if a dimension is negative, the size
                overflows int64, or the data type has no fixed size.
        """
        if self._size == -1:
            size = math.prod(self._shape) * self._data_type.itemsize
            if any(d < 0 for d in self._shape) or size > INT64_MAX:
                raise param_invalid(
                    None,
                    f"CacheDesc: failed to calc tensor size, shape = {self._shape}, "
                    f"data_type = {self._data_type}",
                )
            self._size = size
        return self._size

    def update_dim(self, dim_index: int, dim_value: int) -> None:
        """Set ``shape[dim_index] = dim_value`` and forget the cached ``size``.

        A tuple shape is replaced by a new tuple; a list is changed in place.

        Raises:
            TypeError: If an argument is not int.
            ValueError: If ``dim_value`` is not int64.
            LLMException: ``LLM_PARAM_INVALID`` if ``dim_index`` is out of range.
        """
        check_isinstance("dim_index", dim_index, int, allow_none=False)
        check_int64("dim_value", dim_value)
        ensure(
            0 <= dim_index < len(self._shape),
            f"update_dim: dim_index {dim_index} out of range [0, {len(self._shape)})",
        )
        if isinstance(self._shape, tuple):
            shape = list(self._shape)
            shape[dim_index] = dim_value
            self._shape = tuple(shape)
        else:
            self._shape[dim_index] = dim_value
        self._size = -1

    def __repr__(self) -> str:
        # Reproduces the reference's text, including its missing space before kv_tensor_format.
        return (
            f"CacheDesc(num_tensors={self._num_tensors}, shape={self._shape}, "
            f"data_type={self._data_type}, placement={self._placement}, "
            f"batch_dim_index={self._batch_dim}, "
            f"seq_len_dim_index={self._seq_len_dim_index},"
            f"kv_tensor_format={self._kv_tensor_format})"
        )


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


# --------------------------------------------------------------------------------------------
# Cache handle


class Cache:
    """A registered or allocated cache; returned by the cache manager, not built by users.

    Args:
        cache_id: Engine-assigned id (int64); -1 for :meth:`create_cpu_cache`.
        cache_desc: The cache's description.
        tensor_addrs: One address per tensor (copied).
        cache_manager: The owning manager, or None.
        is_registered: True if the memory is user memory registered with the engine.
        is_blocks_cache: True for a blocks (paged) cache.
        remote_accessible: True if peers may read and write it.
    """

    __slots__ = (
        "_cache_desc",
        "_cache_id",
        "_cache_manager",
        "_is_blocks_cache",
        "_is_registered",
        "_remote_accessible",
        "_tensor_addrs",
        "_valid",
    )

    def __init__(
        self,
        cache_id: int,
        cache_desc: CacheDesc,
        tensor_addrs: list[int],
        cache_manager: Any = None,
        is_registered: bool = True,
        is_blocks_cache: bool = False,
        remote_accessible: bool = False,
    ) -> None:
        check_int64("cache_id", cache_id)
        self._cache_id = cache_id
        self._cache_desc = cache_desc
        self._tensor_addrs = list(tensor_addrs)
        self._cache_manager = cache_manager
        self._is_registered = is_registered
        self._is_blocks_cache = is_blocks_cache
        self._remote_accessible = remote_accessible
        self._valid = True

    @classmethod
    def create_cpu_cache(cls, cache_desc: CacheDesc, addrs: list[int]) -> Cache:
        """Wrap existing host buffers as a blocks cache (for ``swap_blocks``).

        Args:
            cache_desc: Description with ``placement == HOST``.
            addrs: One address per tensor; must be a list of int.

        Returns:
            A cache with ``cache_id == -1``, ``is_blocks_cache == True``, no manager, not
            registered with any engine.

        Raises:
            TypeError: ``cache_desc`` is not a CacheDesc, or ``addrs`` not a list of int.
            AttributeError: ``cache_desc`` is None (as documented by the reference).
            LLMException: ``LLM_PARAM_INVALID`` if the placement is not HOST or
                ``len(addrs) != num_tensors``.
        """
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        check_isinstance("addrs", addrs, list, allow_none=False, inner=int)
        if cache_desc is None:
            raise AttributeError("create_cpu_cache: cache_desc is None, it has no placement")
        ensure(
            cache_desc.placement == Placement.HOST,
            f"create_cpu_cache: cache_desc.placement must be Placement.HOST, "
            f"got {cache_desc.placement}",
        )
        ensure(
            cache_desc.num_tensors == len(addrs),
            f"create_cpu_cache: len(addrs) ({len(addrs)}) must equal cache_desc.num_tensors "
            f"({cache_desc.num_tensors})",
        )
        return cls(-1, cache_desc, addrs, None, is_registered=False, is_blocks_cache=True)

    @property
    def cache_id(self) -> int:
        """Engine-assigned id, starting at 1; -1 for CPU caches."""
        return self._cache_id

    @property
    def cache_desc(self) -> CacheDesc:
        """The cache's description."""
        return self._cache_desc

    @property
    def tensor_addrs(self) -> list[int]:
        """One address per tensor; empty once the cache is deallocated or unregistered."""
        return self._tensor_addrs

    @property
    def is_blocks_cache(self) -> bool:
        """True for a blocks (paged) cache."""
        return self._is_blocks_cache

    @property
    def is_registered(self) -> bool:
        """True if the memory is user memory registered with the engine."""
        return self._is_registered

    @property
    def remote_accessible(self) -> bool:
        """True if peers may read and write this cache."""
        return self._remote_accessible

    def _invalidate(self) -> None:
        """Mark the cache as released; ``tensor_addrs`` becomes empty."""
        # A new list, so a list the caller still holds is not cleared under them.
        self._tensor_addrs = []
        self._valid = False

    def __repr__(self) -> str:
        return (
            f"Cache(cache_id={self._cache_id}, num_addrs={len(self._tensor_addrs)}, "
            f"is_blocks_cache={self._is_blocks_cache}, "
            f"remote_accessible={self._remote_accessible})"
        )


# --------------------------------------------------------------------------------------------
# Peer descriptor


def ipv6_or_none(text: str) -> str | None:
    """Return the canonical form of an IPv6 address (brackets allowed), else None."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):
        return None


def parse_ip(ip: str | int) -> str | int:
    """IPv4 text -> little-endian int (reference); IPv6 text -> canonical text; int as is.

    Raises:
        RuntimeError: ``"Can not parse ip str:..."`` (the reference's error) for bad text.
    """
    if not isinstance(ip, str):
        return ip
    try:
        return int.from_bytes(socket.inet_aton(ip), byteorder="little")
    except OSError:
        pass
    v6 = ipv6_or_none(ip)
    if v6 is None:
        raise RuntimeError(f"Can not parse ip str:{ip}")
    return v6


def ip_to_str(ip: str | int) -> str:
    """Render a stored ip (little-endian IPv4 int, or IPv6 string) as text."""
    if isinstance(ip, str):
        return ip
    return socket.inet_ntoa(int(ip).to_bytes(4, byteorder="little"))


class LLMClusterInfo:
    """Describes one peer for ``link_clusters`` / ``unlink_clusters``.

    ``LLMClusterInfo()`` then set :attr:`remote_cluster_id` and call
    :meth:`append_remote_ip_info` (and :meth:`append_local_ip_info`), as in the reference.

    Args:
        remote_cluster_id: dxl extension: sets :attr:`remote_cluster_id`.
        remote_ip: dxl extension: with ``remote_port``, calls :meth:`append_remote_ip_info`.
        remote_port: dxl extension: see ``remote_ip``.

    Raises:
        LLMException: ``LLM_PARAM_INVALID`` if only one of ``remote_ip``/``remote_port``
            is given.
    """

    __slots__ = (
        "_local_ip_info_list",
        "_remote_cluster_id",
        "_remote_ip_info_list",
        "_remote_role_type",
    )

    def __init__(
        self,
        *,
        remote_cluster_id: int | None = None,
        remote_ip: str | int | None = None,
        remote_port: int | None = None,
    ) -> None:
        self._remote_cluster_id: int | None = None
        self._remote_role_type: LLMRole | int | None = None
        self._local_ip_info_list: list[tuple[str | int, int]] = []
        self._remote_ip_info_list: list[tuple[str | int, int]] = []
        if remote_cluster_id is not None:
            self.remote_cluster_id = remote_cluster_id
        ensure(
            (remote_ip is None) == (remote_port is None),
            "LLMClusterInfo: give both remote_ip and remote_port, or neither",
        )
        if remote_ip is not None:
            self.append_remote_ip_info(remote_ip, remote_port)  # type: ignore[arg-type]

    @property
    def remote_cluster_id(self) -> int | None:
        """The peer's cluster id; None until set."""
        return self._remote_cluster_id

    @remote_cluster_id.setter
    def remote_cluster_id(self, value: int) -> None:
        check_uint64("remote_cluster_id", value)
        self._remote_cluster_id = value

    @property
    def remote_role_type(self) -> LLMRole | int | None:
        """The peer's role (unused in v2)."""
        return self._remote_role_type

    @remote_role_type.setter
    def remote_role_type(self, value: LLMRole | int) -> None:
        check_isinstance("remote_role_type", value, (LLMRole, int))
        self._remote_role_type = value

    @property
    def local_ip_info_list(self) -> list[tuple[str | int, int]]:
        """``(ip, port)`` entries added by :meth:`append_local_ip_info`."""
        return self._local_ip_info_list

    @property
    def remote_ip_info_list(self) -> list[tuple[str | int, int]]:
        """``(ip, port)`` entries added by :meth:`append_remote_ip_info`."""
        return self._remote_ip_info_list

    @staticmethod
    def _checked_ip(ip: str | int, port: int) -> str | int:
        check_isinstance("ip", ip, (str, int), allow_none=False)
        check_uint16("port", port)
        if isinstance(ip, int):
            check_uint32("ip", ip)
        return parse_ip(ip)

    def append_local_ip_info(self, ip: str | int, port: int) -> None:
        """Add this side's host ip and port.

        Args:
            ip: Dotted IPv4 (stored as its little-endian int), an IPv4 int, or IPv6 text
                (dxl extension, stored as canonical text).
            port: uint16; 0 is allowed.

        Raises:
            TypeError: ``ip`` not str/int or ``port`` not int.
            ValueError: ``port`` not uint16 or an int ``ip`` not uint32.
            RuntimeError: ``"Can not parse ip str:..."`` for an unparsable ip string.
        """
        self._local_ip_info_list.append((self._checked_ip(ip, port), port))

    def append_remote_ip_info(self, ip: str | int, port: int) -> None:
        """Add the peer's listening host ip and port (same rules as the local one)."""
        self._remote_ip_info_list.append((self._checked_ip(ip, port), port))

    def remote_endpoint(self) -> tuple[str, int]:
        """Return the first remote entry as ``(ip text, port)``.

        Raises:
            LLMException: ``LLM_PARAM_INVALID`` if no remote ip was added.
        """
        ensure(
            bool(self._remote_ip_info_list),
            f"LLMClusterInfo(remote_cluster_id={self._remote_cluster_id}): "
            "remote_ip_info_list is empty",
        )
        ip, port = self._remote_ip_info_list[0]
        return ip_to_str(ip), port

    def __repr__(self) -> str:
        remotes = [(ip_to_str(ip), port) for ip, port in self._remote_ip_info_list]
        locals_ = [(ip_to_str(ip), port) for ip, port in self._local_ip_info_list]
        return (
            f"LLMClusterInfo(remote_cluster_id={self._remote_cluster_id}, "
            f"remote_ip_info_list={remotes}, local_ip_info_list={locals_})"
        )


class MemInfo:
    """A memory range for ``remap_registered_memory`` (reserved feature).

    Args:
        mem_type: Device or host.
        addr: Start address.
        size: Length in bytes.

    Raises:
        TypeError: Wrong argument type.
    """

    __slots__ = ("_addr", "_mem_type", "_size")

    def __init__(self, mem_type: Memtype, addr: int, size: int) -> None:
        check_isinstance("mem_type", mem_type, Memtype, allow_none=False)
        check_isinstance("addr", addr, int, allow_none=False)
        check_isinstance("size", size, int, allow_none=False)
        self._mem_type = mem_type
        self._addr = addr
        self._size = size

    @property
    def mem_type(self) -> Memtype:
        """Device or host."""
        return self._mem_type

    @property
    def addr(self) -> int:
        """Start address."""
        return self._addr

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self._size

    def __repr__(self) -> str:
        return f"MemInfo(mem_type={self._mem_type}, addr={self._addr}, size={self._size})"


# --------------------------------------------------------------------------------------------
# transfer_cache_async


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
