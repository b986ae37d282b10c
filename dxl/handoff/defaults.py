"""The handoff's defaults and bounds, in one place: its components read them, and so does the
vLLM connector's config (whose defaults are the handoff's)."""

from __future__ import annotations

DEFAULT_LEASE_S = 30.0  # as vLLM's NIXL connector
MAX_LEASES = 10  # renewals keep an unclaimed offer at most this many leases after it was made
DEFAULT_FETCH_TIMEOUT_S = 30.0
DEFAULT_MAX_FETCHES = 64  # fetches in flight per engine; more wait (renewing their leases)
ABORT_TIMEOUT_S = 5.0  # the other side confirms an abort within this, or loses its link
CALLER_OFFER_IDS = 1 << 32  # offer ids a caller chooses start here; the engine's stay below
