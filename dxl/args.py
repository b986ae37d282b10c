"""Argument checks shared by the transfer operations, in the reference's order and error types.

Each check names the operation and the argument in its message. Block lists are checked with
numpy (dtype and min/max), not a Python loop per element.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._validate import check_isinstance, check_layer_range, check_uint32
from .errors import LLMException, LLMStatusCode

_INT_KINDS = frozenset("iub")  # bool counts as int, as in Python and the reference


def fail(op: str, code: LLMStatusCode, message: str) -> LLMException:
    """The reference's engine-style failure: ``<op> failed, error code is <code>, <message>.``"""
    return LLMException(f"{op} failed, error code is {code}, {message}.", status_code=code)


def param_invalid(op: str, message: str) -> LLMException:
    """:func:`fail` for a rule broken by an argument."""
    return fail(op, LLMStatusCode.LLM_PARAM_INVALID, message)


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
    if blocks.size and (int(blocks.min()) < 0 or int(blocks.max()) >= num_blocks):
        lo, hi = int(blocks.min()), int(blocks.max())
        raise param_invalid(
            op, f"{name} must lie in [0, {num_blocks}), got indices from {lo} to {hi}"
        )


def layer_kwargs(op: str, kwargs: dict[str, Any]) -> tuple[range | None, range | None, int]:
    """The optional layer-wise keyword arguments of pull_blocks / pull_cache."""
    allowed = {"src_layer_range", "dst_layer_range", "tensor_num_per_layer"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"{op}: unexpected keyword argument(s) {sorted(unknown)}")
    tnpl = kwargs.get("tensor_num_per_layer", 2)
    src_range = kwargs.get("src_layer_range")
    dst_range = kwargs.get("dst_layer_range")
    return src_range, dst_range, tnpl


def check_tensor_num_per_layer(op: str, tnpl: Any) -> None:
    check_uint32("tensor_num_per_layer", tnpl)
    if tnpl == 0:
        raise param_invalid(op, "tensor_num_per_layer must be > 0")


def check_ranges(op: str, src_range: Any, dst_range: Any) -> None:
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
    from .types import Cache

    if cache is None:
        raise AttributeError(f"{op}: {name} is None; pass the Cache returned at registration")
    check_isinstance(name, cache, Cache)


def same_length(op: str, a_name: str, a: Sequence[Any], b_name: str, b: Sequence[Any]) -> None:
    if len(a) != len(b):
        raise param_invalid(
            op, f"{a_name} and {b_name} must have the same length, got {len(a)} and {len(b)}"
        )
