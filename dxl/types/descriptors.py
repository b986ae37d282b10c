"""What describes memory: a cache's shape (:class:`CacheDesc`), the handle of a registered or
allocated cache (:class:`Cache`), and a raw memory range (:class:`MemInfo`)."""

from __future__ import annotations

import math
from typing import Any

from dxl._validate import (
    INT64_MAX,
    check_int32,
    check_int64,
    check_int64_list,
    check_isinstance,
    check_uint32,
    ensure,
)
from dxl.errors import param_invalid
from dxl.types.enums import DataType, Memtype, Placement

__all__ = ["MAX_SHAPE_RANK", "Cache", "CacheDesc", "MemInfo"]

MAX_SHAPE_RANK = 32
"""Largest tensor rank the engine accepts (spec section 11)."""


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
