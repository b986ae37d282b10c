"""Fixtures of the request handoff tests (helpers: handoff_kit.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from handoff_kit import prefill_starter
from peer import Peer


@pytest.fixture
def start_prefill(make_peer: Callable[..., Peer]) -> Callable[..., Peer]:
    """``start_prefill(cluster_id=P_ID, layout=SMALL, seed=PREFILL_SEED, **peer_kw)``."""
    return prefill_starter(make_peer)
