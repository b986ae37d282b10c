"""Every argument check of dxl, in the reference's conventions (spec 3.3), in one place.

* wrong Python type (also of a list element or dict key/value) -> ``TypeError``;
* integer outside its C width -> ``ValueError``;
* semantic rule broken -> ``LLMException(LLM_PARAM_INVALID)``.

``bool`` passes where ``int`` is expected, as it does in the reference (it is an ``int``).
Every message names the argument, so a caller can tell which one was wrong. The first part
holds the checks of single values that the public types use; the second the checks of the
engine's operations (block lists with numpy min/max, layer ranges, cache arguments, keys and
local-copy maps), which name the operation too. Rules that depend on a registration's layout
are checked where the layout is known (``dxl.engine.resolve``, ``dxl.memory.localcopy``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from dxl.errors import LLMStatusCode, fail, param_invalid

if TYPE_CHECKING:
    from dxl.types import CacheKey

__all__ = [
    "INT32_MAX",
    "INT64_MAX",
    "UINT16_MAX",
    "UINT32_MAX",
    "UINT64_MAX",
    "block_list",
    "check_blocks_in_range",
    "check_cache_arg",
    "check_cache_key",
    "check_copy_block_info",
    "check_copy_cache_args",
    "check_dict",
    "check_int32",
    "check_int64",
    "check_int64_list",
    "check_isinstance",
    "check_layer_range",
    "check_layer_ranges",
    "check_src_to_dst",
    "check_tensor_num_per_layer",
    "check_uint16",
    "check_uint32",
    "check_uint64",
    "check_uint64_list",
    "ensure",
    "is_valid_id",
    "same_length",
    "select_tensors",
    "type_name",
    "uint64",
]

UINT16_MAX = 2**16 - 1
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

ClassSpec = type | tuple[type, ...] | list[type]


def type_name(classes: ClassSpec) -> str:
    """Render one class or several as ``"int"`` / ``"list or tuple"``."""
    if isinstance(classes, type):
        return classes.__name__
    return " or ".join(c.__name__ for c in classes)


def _as_tuple(classes: ClassSpec) -> type | tuple[type, ...]:
    return tuple(classes) if isinstance(classes, list) else classes


def ensure(
    condition: bool,
    message: str,
    status_code: LLMStatusCode = LLMStatusCode.LLM_PARAM_INVALID,
) -> None:
    """Raise ``LLMException(status_code)`` with ``message`` unless ``condition`` holds.

    Args:
        condition: The rule that must be true.
        message: Names the argument and the rule.
        status_code: Status to raise with; ``LLM_PARAM_INVALID`` by default.

    Raises:
        LLMException: If ``condition`` is false.
    """
    if not condition:
        raise fail(None, status_code, message)


def check_isinstance(
    name: str,
    value: Any,
    classes: ClassSpec,
    *,
    allow_none: bool = True,
    inner: ClassSpec | None = None,
    prefix: str = "",
) -> None:
    """Check ``value``'s type (and, with ``inner``, the type of each list/tuple element).

    Args:
        name: Argument name used in the message.
        value: The value to check.
        classes: Accepted class or classes.
        allow_none: Accept ``None`` (the reference's default).
        inner: If given, every element of ``value`` must be an instance of it.
        prefix: Text put before the message (the reference's "The first param ").

    Raises:
        TypeError: Naming the argument (and element index), expected and actual type.
    """
    if value is None and allow_none:
        return
    if not isinstance(value, _as_tuple(classes)):
        raise TypeError(f"{prefix}{name} must be {type_name(classes)}, got {type(value).__name__}")
    if inner is not None:
        accepted = _as_tuple(inner)
        for i, item in enumerate(cast("Iterable[Any]", value)):  # a list or tuple here
            if not isinstance(item, accepted):
                raise TypeError(
                    f"{prefix}{name}[{i}] must be {type_name(inner)}, got {type(item).__name__}"
                )


def check_dict(
    name: str,
    value: Any,
    key_cls: ClassSpec,
    value_cls: ClassSpec,
    *,
    allow_none: bool = False,
) -> None:
    """Check that ``value`` is a dict whose keys and values have the given types.

    Args:
        name: Argument name used in the message.
        value: The value to check.
        key_cls: Accepted key class(es).
        value_cls: Accepted value class(es).
        allow_none: Accept ``None``.

    Raises:
        TypeError: If ``value`` is not a dict, or a key or value has the wrong type.
    """
    check_isinstance(name, value, dict, allow_none=allow_none)
    if value is None:
        return
    keys, values = _as_tuple(key_cls), _as_tuple(value_cls)
    for k, v in value.items():
        if not isinstance(k, keys):
            raise TypeError(
                f"{name} keys must be {type_name(key_cls)}, got {type(k).__name__} ({k!r})"
            )
        if not isinstance(v, values):
            raise TypeError(f"{name}[{k!r}] must be {type_name(value_cls)}, got {type(v).__name__}")


def _check_int_range(name: str, value: Any, low: int, high: int, kind: str) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be a {kind} in [{low}, {high}], got {value}")


def check_uint16(name: str, value: Any) -> None:
    """Require an ``int`` in ``[0, 2**16 - 1]`` (TypeError, then ValueError)."""
    _check_int_range(name, value, 0, UINT16_MAX, "uint16")


def check_uint32(name: str, value: Any) -> None:
    """Require an ``int`` in ``[0, 2**32 - 1]`` (TypeError, then ValueError)."""
    _check_int_range(name, value, 0, UINT32_MAX, "uint32")


def check_int32(name: str, value: Any) -> None:
    """Require an ``int`` in ``[-2**31, 2**31 - 1]`` (TypeError, then ValueError)."""
    _check_int_range(name, value, -INT32_MAX - 1, INT32_MAX, "int32")


def check_int64(name: str, value: Any) -> None:
    """Require an ``int`` in ``[-2**63, 2**63 - 1]`` (TypeError, then ValueError)."""
    _check_int_range(name, value, -INT64_MAX - 1, INT64_MAX, "int64")


def check_uint64(name: str, value: Any) -> None:
    """Require an ``int`` in ``[0, 2**64 - 1]`` (TypeError, then ValueError)."""
    _check_int_range(name, value, 0, UINT64_MAX, "uint64")


def uint64(name: str, value: Any) -> int:
    """:func:`check_uint64`, returning the value typed as the int it was checked to be."""
    check_uint64(name, value)
    checked: int = value
    return checked


def check_uint64_list(name: str, values: Iterable[Any]) -> None:
    """Apply :func:`check_uint64` to each element, naming it ``name[i]``."""
    for i, v in enumerate(values):
        check_uint64(f"{name}[{i}]", v)


def check_int64_list(name: str, values: Iterable[Any]) -> None:
    """Apply :func:`check_int64` to each element, naming it ``name[i]``."""
    for i, v in enumerate(values):
        check_int64(f"{name}[{i}]", v)


def check_layer_range(name: str, value: Any, *, allow_none: bool = True) -> None:
    """Check a layer range: a ``range`` with step 1 and ``0 <= start < stop``.

    Args:
        name: Argument name used in the message.
        value: The range to check.
        allow_none: Accept ``None`` ("all layers").

    Raises:
        TypeError: If ``value`` is not a ``range`` (or is ``None`` when not allowed).
        LLMException: ``LLM_PARAM_INVALID`` if the step is not 1 or the bounds are wrong.
    """
    check_isinstance(name, value, range, allow_none=allow_none)
    if value is None:
        return
    ensure(value.step == 1, f"{name} must have step 1, got {value}")
    ensure(
        0 <= value.start < value.stop,
        f"{name} must satisfy 0 <= start < stop, got {value}",
    )


# --------------------------------------------------------------------------------------------
# Arguments of the engine's operations (messages name the operation)

_INT_KINDS = frozenset("iub")  # bool counts as int, as in Python and the reference


def block_list(op: str, name: str, value: Any) -> np.ndarray:
    """A list/tuple of ints as an int64 array (TypeError for anything else)."""
    if value is None:
        value = ()
    if not isinstance(value, list | tuple):
        raise TypeError(f"{op}: {name} must be a list or tuple of int, got {type(value).__name__}")
    if not value:
        return np.zeros(0, dtype=np.int64)
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError):
        arr = np.asarray(value, dtype=object)
    if arr.ndim != 1 or arr.dtype.kind not in _INT_KINDS:
        bad = next((v for v in value if not isinstance(v, int)), None)
        if bad is None:  # ints too large for int64: a range error, not a type error
            raise param_invalid(op, f"{name} holds a block index outside the int64 range")
        raise TypeError(
            f"{op}: {name} must be a list or tuple of int, got an element of type "
            f"{type(bad).__name__}"
        )
    return arr.astype(np.int64, copy=False)


def check_blocks_in_range(op: str, name: str, blocks: np.ndarray, num_blocks: int) -> None:
    """Every index of ``blocks`` lies in ``[0, num_blocks)``."""
    if blocks.size and (int(blocks.min()) < 0 or int(blocks.max()) >= num_blocks):
        lo, hi = int(blocks.min()), int(blocks.max())
        raise param_invalid(
            op, f"{name} must lie in [0, {num_blocks}), got indices from {lo} to {hi}"
        )


def check_tensor_num_per_layer(op: str, tnpl: Any) -> None:
    check_uint32("tensor_num_per_layer", tnpl)
    if tnpl == 0:
        raise param_invalid(op, "tensor_num_per_layer must be > 0")


def check_layer_ranges(src_range: Any, dst_range: Any) -> None:
    check_layer_range("src_layer_range", src_range, allow_none=True)
    check_layer_range("dst_layer_range", dst_range, allow_none=True)


def select_tensors(
    op: str, side: str, num_tensors: int, layer_range: range | None, tnpl: int
) -> slice:
    """Tensor indices [start*T, stop*T) of one side, checked against its tensor count."""
    if layer_range is None:
        return slice(0, num_tensors)
    if num_tensors % tnpl:
        raise param_invalid(
            op,
            f"{side} cache has {num_tensors} tensors, not a multiple of "
            f"tensor_num_per_layer={tnpl}, so it has no layers",
        )
    if layer_range.stop * tnpl > num_tensors:
        raise param_invalid(
            op,
            f"{side}_layer_range {layer_range} exceeds the {num_tensors // tnpl} layers of the "
            f"{side} cache",
        )
    return slice(layer_range.start * tnpl, layer_range.stop * tnpl)


def check_cache_arg(op: str, name: str, cache: Any) -> None:
    """A Cache argument: None is dereferenced later in the reference, hence AttributeError."""
    from dxl.types import Cache

    if cache is None:
        raise AttributeError(f"{op}: {name} is None; pass the Cache returned at registration")
    check_isinstance(name, cache, Cache)


def same_length(op: str, a_name: str, a: Sized, b_name: str, b: Sized) -> None:
    if len(a) != len(b):
        raise param_invalid(
            op, f"{a_name} and {b_name} must have the same length, got {len(a)} and {len(b)}"
        )


def is_valid_id(value: int) -> bool:
    """A CacheKey id that is set (UINT64_MAX means "unset")."""
    return 0 <= value < UINT64_MAX


def check_cache_key(op: str, key: CacheKey) -> None:
    """Exactly one of ``req_id`` / ``prefix_id`` must be valid (spec 4.4)."""
    if is_valid_id(key.req_id) == is_valid_id(key.prefix_id):
        raise param_invalid(
            op,
            f"{key!r} must have exactly one of req_id and prefix_id set (not UINT64_MAX)",
        )


def check_copy_cache_args(
    dst_batch_index: Any, src_batch_index: Any, offset: Any, size: Any, req_id: Any = None
) -> None:
    """Types and widths of ``copy_cache``'s scalar arguments (spec 6.13).

    Raises:
        TypeError: An argument is not an int (``req_id``: int or None).
        ValueError: Batch index outside uint32, ``offset``/``req_id`` outside uint64, ``size``
            outside int64.
        LLMException: ``LLM_PARAM_INVALID`` if ``size`` is neither -1 nor > 0.
    """
    check_uint32("dst_batch_index", dst_batch_index)
    check_uint32("src_batch_index", src_batch_index)
    check_uint64("offset", offset)
    check_int64("size", size)
    if req_id is not None:
        check_uint64("req_id", req_id)
    if size != -1 and size <= 0:
        raise param_invalid(
            "copy_cache", f"size must be -1 (to the end of the batch) or > 0, got {size}"
        )


def check_copy_block_info(value: Any) -> None:
    """``copy_block_info`` must be a dict of int -> list of int (spec 6.14).

    Raises:
        TypeError: Naming the argument and the offending key or element.
    """
    check_dict("copy_block_info", value, int, (list, tuple))
    for src, dsts in value.items():
        for i, dst in enumerate(dsts):
            if not isinstance(dst, int):
                raise TypeError(
                    f"copy_block_info[{src!r}][{i}] must be int, got {type(dst).__name__}"
                )


def check_src_to_dst(value: Any) -> None:
    """``src_to_dst`` must be a dict of int -> int (spec 6.15).

    Raises:
        TypeError: Naming the argument and the offending key or value.
    """
    check_dict("src_to_dst", value, int, int)
