"""The handoff's defaults and bounds.

The user settings among them (an offer's lease, a fetch's timeout, fetches in flight) are engine
options now, defined with their bounds in the option table (:mod:`dxl.config`:
``dxl.HandoffLeaseS``, ``dxl.HandoffFetchTimeoutS``, ``dxl.HandoffMaxFetches``); their defaults
are re-exported here under the names the handoff's components and the vLLM connector import.
What stays defined here is protocol, not a setting: both ends must agree on it.
"""

from __future__ import annotations

from ..config import DEFAULT_HANDOFF_FETCH_TIMEOUT_S as DEFAULT_FETCH_TIMEOUT_S
from ..config import DEFAULT_HANDOFF_LEASE_S as DEFAULT_LEASE_S
from ..config import DEFAULT_HANDOFF_MAX_FETCHES as DEFAULT_MAX_FETCHES
from ..config import MAX_HANDOFF_SECONDS

__all__ = [
    "ABORT_TIMEOUT_S",
    "CALLER_OFFER_IDS",
    "DEFAULT_FETCH_TIMEOUT_S",
    "DEFAULT_LEASE_S",
    "DEFAULT_MAX_FETCHES",
    "MAX_HANDOFF_SECONDS",
    "MAX_LEASES",
]

MAX_LEASES = 10  # renewals keep an unclaimed offer at most this many leases after it was made
ABORT_TIMEOUT_S = 5.0  # the other side confirms an abort within this, or loses its link
CALLER_OFFER_IDS = 1 << 32  # offer ids a caller chooses start here; the engine's stay below
