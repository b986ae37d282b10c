"""A registry of the memory ranges peers may touch (``dxl_registry_t``).

Each engine owns one :class:`RegionRegistry`; its tcp data server checks every request against
that registry and no other, so two engines in one process never serve each other's memory.
Registering a range does not pin or touch it: the registry only answers bounds checks.
"""

from __future__ import annotations

from typing import Any

from .. import _ffi

__all__ = ["RegionRegistry"]


class RegionRegistry:
    """The native region registry of one engine.

    Free it with :meth:`close` once no data server uses it (a server started with it must be
    stopped first, see :meth:`attach`); an unclosed registry is freed when garbage collected.
    """

    def __init__(self) -> None:
        out = _ffi.ffi.new("dxl_registry_t **")
        _ffi.check(_ffi.lib.dxl_registry_new(out), "new region registry")
        self._native: Any = _ffi.ffi.gc(out[0], _ffi.lib.dxl_registry_free)
        self._servers = 0  # data servers started with it and not yet stopped

    def __repr__(self) -> str:
        state = "closed" if self._native is None else f"{self._servers} server(s)"
        return f"RegionRegistry({state})"

    @property
    def native(self) -> Any:
        """The ``dxl_registry_t *`` for native calls.

        Raises:
            RuntimeError: the registry was closed.
        """
        if self._native is None:
            raise RuntimeError("the region registry was closed")
        return self._native

    def add(self, base: int, length: int) -> int:
        """Register ``[base, base + length)``; returns the region's id.

        Raises:
            NativeError: a zero length or a range that wraps (DXL_E_INVAL), out of memory.
        """
        out = _ffi.ffi.new("uint64_t *")
        _ffi.check(_ffi.lib.dxl_region_add(self.native, base, length, out), "register region")
        return int(out[0])

    def remove(self, region_id: int) -> bool:
        """Unregister a region: True, or False if no live region has this id. A data server may
        still be touching the memory until its ``fence`` returns."""
        return bool(_ffi.lib.dxl_region_remove(self.native, region_id) == 0)

    def attach(self) -> None:
        """A data server now uses this registry (until :meth:`detach`): closing is refused."""
        self.native  # noqa: B018 (raises if closed)
        self._servers += 1

    def detach(self) -> None:
        """The data server that :meth:`attach` counted has stopped."""
        self._servers -= 1

    def close(self) -> None:
        """Free the registry and any region still in it. Idempotent.

        Raises:
            RuntimeError: a data server still uses it (stop that first).
        """
        if self._native is None:
            return
        if self._servers:
            raise RuntimeError(
                f"the region registry is still used by {self._servers} data server(s)"
            )
        native, self._native = self._native, None
        _ffi.ffi.release(native)  # runs dxl_registry_free now
