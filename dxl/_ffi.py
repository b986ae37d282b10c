"""The only door to the native shim ``dxl._dxl_native`` (built from ``native/``).

Everything else in dxl imports ``ffi``/``lib`` from here, and turns the shim's negative return
codes into exceptions through :func:`check`, the one place that does so. The C API, with pointer
ownership, is documented in ``native/dxl.h``.

cffi releases the GIL around every ``lib`` call; the shim's saved errno is per thread, so
:func:`check` must run on the thread that made the call, right after it (it always does when
used as ``check(lib.dxl_x(...), "what")``).
"""

from __future__ import annotations

import errno as _errno
import importlib.metadata
from typing import Any

import numpy as np

from ._dxl_native import ffi, lib
from .errors import DxlError

__all__ = [
    "HAS_CMA",
    "VERSION",
    "NativeError",
    "as_u64_ptr",
    "check",
    "counters",
    "err_name",
    "ffi",
    "lib",
]

VERSION: str = ffi.string(lib.DXL_VERSION).decode()
HAS_CMA: bool = bool(lib.DXL_HAS_CMA)


def _verify_version() -> None:
    """Refuse a stale shim: its version must equal the installed package's."""
    try:
        installed = importlib.metadata.version("dxl")
    except importlib.metadata.PackageNotFoundError:
        return
    if installed != VERSION:
        raise ImportError(
            f"dxl native shim is version {VERSION} but the dxl package is {installed}: "
            "rebuild it (pip install -e . or python native/build_ffi.py)"
        )


_verify_version()


def err_name(code: int) -> str:
    """The name of a DXL_* return code, e.g. ``"DXL_E_SRCH"`` (``"DXL_E_UNKNOWN"`` if unknown)."""
    return ffi.string(lib.dxl_err_name(code)).decode()


class NativeError(DxlError):
    """A native call failed.

    Attributes:
        code: the negative DXL_E_* return code.
        errno: the errno behind it (0 when the failure had none).
        name: the code's name, e.g. ``"DXL_E_SRCH"``.
        what: what was being done, as given to :func:`check`.
    """

    def __init__(self, code: int, what: str, errno: int = 0) -> None:
        self.code = code
        self.errno = errno
        self.name = err_name(code)
        self.what = what
        detail = self.name
        if errno:
            detail += f", errno {errno} {_errno.errorcode.get(errno, '?')}"
        message = ffi.string(lib.dxl_strerror(code)).decode()
        super().__init__(f"{what}: {message} ({detail})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.what, self.errno))


def check(rc: int, what: str) -> int:
    """Return ``rc`` if it is not negative, else raise :class:`NativeError`.

    Args:
        rc: a return value of a ``lib.dxl_*`` call made just before, on this thread.
        what: what the call was doing, for the message ("cma read").

    Raises:
        NativeError: ``rc`` is negative; carries the code, its name and the saved errno.
    """
    if rc < 0:
        raise NativeError(rc, what, lib.dxl_last_errno())
    return rc


def as_u64_ptr(arr: np.ndarray) -> Any:
    """A ``uint64_t[]`` cdata over ``arr``'s memory (no copy); keep ``arr`` alive while it is used.

    Raises:
        TypeError: ``arr`` is not a numpy array of dtype uint64.
        ValueError: ``arr`` is not C-contiguous.
    """
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint64:
        raise TypeError(f"expected a numpy uint64 array, got {getattr(arr, 'dtype', type(arr))}")
    if not arr.flags.c_contiguous:
        raise ValueError("expected a C-contiguous array")
    return ffi.from_buffer("uint64_t[]", arr)


def counters() -> dict[str, int]:
    """The shim's leak and debug counters (see ``dxl_counters_t`` in ``native/dxl.h``)."""
    out = ffi.new("dxl_counters_t *")
    lib.dxl_counters(out)
    return {
        "regions_live": int(out.regions_live),
        "peers_open": int(out.peers_open),
        "ops_inflight": int(out.ops_inflight),
        "bytes_registered": int(out.bytes_registered),
        "ops_split": int(out.ops_split),
        "registries_live": int(out.registries_live),
    }
