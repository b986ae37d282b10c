"""Argument checks shared by the public types, mirroring the reference's conventions (spec 3.3).

* wrong Python type (also of a list element or dict key/value) -> ``TypeError``;
* integer outside its C width -> ``ValueError``;
* semantic rule broken -> ``LLMException(LLM_PARAM_INVALID)``.

``bool`` passes where ``int`` is expected, as it does in the reference (it is an ``int``).
Every message names the argument, so a caller can tell which one was wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dxl.errors import LLMStatusCode, llm_error

__all__ = [
    "INT32_MAX",
    "INT64_MAX",
    "UINT16_MAX",
    "UINT32_MAX",
    "UINT64_MAX",
    "check_dict",
    "check_int32",
    "check_int64",
    "check_int64_list",
    "check_isinstance",
    "check_layer_range",
    "check_uint16",
    "check_uint32",
    "check_uint64",
    "check_uint64_list",
    "ensure",
    "type_name",
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
        raise llm_error(status_code, message)


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
        for i, item in enumerate(value):
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
