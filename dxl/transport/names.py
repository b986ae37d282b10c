"""The names of the transports, defined once: :mod:`.select` keys its openers with them, and
:mod:`dxl.config` derives the values ``dxl.Transport`` accepts from them (this module imports
nothing, so the option table can read it without importing the transports themselves).
"""

from __future__ import annotations

__all__ = ["ALL", "AUTO", "AUTO_ORDER", "CMA", "NIXL", "TCP"]

CMA = "cma"
TCP = "tcp"
AUTO = "auto"  # not a transport: the first of AUTO_ORDER that reaches the peer
AUTO_ORDER: tuple[str, ...] = (CMA, TCP)
"""The transports ``auto`` tries, in order (same-host first)."""
NIXL = "nixl"  # only when asked for: needs dxl[nixl], and RDMA hardware or dxl.NixlAllowEmulated
ALL: tuple[str, ...] = (*AUTO_ORDER, NIXL)
"""Every transport ``dxl.Transport`` may name."""
