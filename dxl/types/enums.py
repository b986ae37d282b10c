"""The enums of the public API: roles, placements, data types, memory statuses."""

from __future__ import annotations

from enum import Enum

from dxl.errors import _NamedIntEnum, param_invalid

__all__ = ["DataType", "LLMRole", "Memtype", "Placement", "RegisterMemStatus"]


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
