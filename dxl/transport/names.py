"""The names of the transports, defined once: :mod:`.select` keys its openers with them, and
:mod:`dxl.config` derives the values ``dxl.Transport`` accepts from them (this module imports
nothing, so the option table can read it without importing the transports themselves).
"""

from __future__ import annotations

__all__ = ["AUTO", "AUTO_ORDER", "CMA", "TCP"]

CMA = "cma"
TCP = "tcp"
AUTO = "auto"  # not a transport: the first of AUTO_ORDER that reaches the peer
AUTO_ORDER: tuple[str, ...] = (CMA, TCP)
"""Every transport, in the order ``auto`` tries them (same-host first)."""
