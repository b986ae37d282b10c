"""Request handoff between engines: offer -> ticket -> fetch (or push) -> done, with leases,
aborts and exactly-once ends (see :mod:`dxl.handoff.handoff` and docs/handoff.md)."""

from .handoff import Handoff, HandoffStats
from .ticket import Ended, FetchError, Finished, Ticket

__all__ = ["Ended", "FetchError", "Finished", "Handoff", "HandoffStats", "Ticket"]
