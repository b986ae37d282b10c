"""Status codes and exceptions of the LLM-DataDist API (spec sections 2.6 and 3).

Every failure that is not a plain Python type or width error is an :class:`LLMException`
carrying an :class:`LLMStatusCode`, so callers can branch on ``exc.status_code``.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

__all__ = [
    "DxlError",
    "LLMException",
    "LLMStatusCode",
    "Status",
    "fail",
    "param_invalid",
    "status_from_code",
]


class _NamedIntEnum(IntEnum):
    """IntEnum whose ``str()`` gives ``"Class.NAME"``.

    Python 3.11 changed ``IntEnum.__str__`` to return the bare number; the reference API, and
    messages like ``"error code is LLMStatusCode.LLM_TIMEOUT"``, rely on the name form.
    (With ``__str__`` overridden, ``f"{code}"`` follows it too; ``f"{code:#x}"`` still
    formats the number.)
    """

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


class LLMStatusCode(_NamedIntEnum):
    """Every status code of the reference Python API, with its numeric value."""

    LLM_SUCCESS = 0
    LLM_FAILED = 0xFFFFFFFF
    LLM_WAIT_PROCESS_TIMEOUT = 0x5010B001
    LLM_KV_CACHE_NOT_EXIST = 0x5010B002
    LLM_REPEAT_REQUEST = 0x5010B003
    LLM_REQUEST_ALREADY_COMPLETED = 0x5010B004
    LLM_PARAM_INVALID = 0x5010B005
    LLM_ENGINE_FINALIZED = 0x5010B006
    LLM_NOT_YET_LINK = 0x5010B007
    LLM_ALREADY_LINK = 0x5010B008
    LLM_LINK_FAILED = 0x5010B009
    LLM_UNLINK_FAILED = 0x5010B00A
    LLM_NOTIFY_PROMPT_UNLINK_FAILED = 0x5010B00B
    LLM_CLUSTER_NUM_EXCEED_LIMIT = 0x5010B00C
    LLM_PROCESSING_LINK = 0x5010B00D
    LLM_DEVICE_OUT_OF_MEMORY = 0x5010B00E
    LLM_PREFIX_ALREADY_EXIST = 0x5010B00F
    LLM_PREFIX_NOT_EXIST = 0x5010B010
    LLM_SEQ_LENOVERLIMIT = 0x5010B011  # (sic) the reference's spelling
    LLM_NO_FREE_BLOCK = 0x5010B012
    LLM_BLOCKS_OUT_OF_MEMORY = 0x5010B013
    LLM_EXIST_LINK = 0x5010B018
    LLM_FEATURE_NOT_ENABLED = 0x5010B019
    LLM_TIMEOUT = 0x5010B01A
    LLM_LINK_BUSY = 0x5010B01B
    LLM_OUT_OF_MEMORY = 0x5010B01C
    LLM_DEVICE_MEM_ERROR = 507053
    LLM_SUSPECT_REMOTE_ERROR = 507057
    LLM_UNKNOWN_ERROR = -1


def status_from_code(code: int, default: LLMStatusCode = LLMStatusCode.LLM_FAILED) -> LLMStatusCode:
    """The one map from a raw code (native layer, wire) to its status.

    Args:
        code: An integer status.
        default: What an unmapped code becomes: ``LLM_FAILED`` as the reference's
            ``code_2_status`` does, unless the caller knows better.
    """
    try:
        return LLMStatusCode(code)
    except ValueError:
        return default


def _rebuild_llm_exception(
    cls: type[LLMException], args: tuple[Any, ...], status_code: int
) -> LLMException:
    return cls(*args, status_code=status_from_code(status_code))


class LLMException(RuntimeError):
    """An API failure with a status code.

    Args:
        *args: Exception arguments; the first is the message.
        status_code: Why it failed. Defaults to ``LLM_SUCCESS`` as in the reference.
    """

    def __init__(self, *args: Any, status_code: LLMStatusCode = LLMStatusCode.LLM_SUCCESS) -> None:
        super().__init__(*args)
        self._status_code = status_code

    @property
    def status_code(self) -> LLMStatusCode:
        """The status code this exception reports."""
        return self._status_code

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the status code across pickling (multi-process tests ship exceptions back).
        return (_rebuild_llm_exception, (type(self), self.args, int(self._status_code)))

    def __repr__(self) -> str:
        args = ", ".join(repr(a) for a in self.args)
        sep = ", " if args else ""
        return f"{type(self).__name__}({args}{sep}status_code={self._status_code})"


def fail(op: str | None, code: LLMStatusCode, message: str) -> LLMException:
    """The one way dxl builds the :class:`LLMException` it raises (the caller raises it).

    Args:
        op: The operation that failed: the message becomes the reference's engine form
            ``"<op> failed, error code is <code>, <message>."``. None for a value that breaks a
            documented rule outside an operation (a constructor, an option): the message as is.
        code: Why it failed.
        message: What failed; name the argument and the rule it broke.
    """
    if op is None:
        return LLMException(message, status_code=code)
    return LLMException(f"{op} failed, error code is {code}, {message}.", status_code=code)


def param_invalid(op: str | None, message: str) -> LLMException:
    """:func:`fail` with ``LLM_PARAM_INVALID``: an argument broke a rule."""
    return fail(op, LLMStatusCode.LLM_PARAM_INVALID, message)


class DxlError(Exception):
    """Root of dxl's internal errors (native, transport, wire, authentication). Never raised
    itself, and never seen by API callers: the engine maps each to an :class:`LLMException`
    with a status code, keeping it as the ``__cause__``."""


class Status:
    """A status code wrapper with ``is_ok()`` (reference ``Status``).

    Args:
        status_code: The wrapped code.
    """

    __slots__ = ("_status_code",)

    def __init__(self, status_code: LLMStatusCode) -> None:
        self._status_code = status_code

    @property
    def status_code(self) -> LLMStatusCode:
        """The wrapped status code."""
        return self._status_code

    def is_ok(self) -> bool:
        """Return True iff the status is ``LLM_SUCCESS``."""
        return self._status_code == LLMStatusCode.LLM_SUCCESS

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Status):
            return self._status_code == other._status_code
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._status_code)

    def __repr__(self) -> str:
        return f"Status({self._status_code})"
