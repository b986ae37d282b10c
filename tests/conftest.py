"""Shared fixtures: peer processes, and a check that the native layer leaks nothing."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from peer import Peer

from dxl import _ffi
from dxl.memory.share import SHARED


def pytest_report_header() -> str:
    import dxl

    return f"dxl {dxl.__version__}, features: {dxl.features()}"


def _native_counters() -> dict[str, int]:
    c = _ffi.ffi.new("dxl_counters_t *")
    _ffi.lib.dxl_counters(c)
    return {
        "regions_live": c.regions_live,
        "registries_live": c.registries_live,
        "peers_open": c.peers_open,
        "ops_inflight": c.ops_inflight,
        "shared_spans": SHARED.live(),  # memfds of dxl.ShareRegistered (Python side)
    }


@pytest.fixture(autouse=True)
def no_native_leaks() -> Iterator[None]:
    """Every test must leave as many live regions and registries, in-flight ops and shares as it
    found."""
    before = _native_counters()
    yield
    gc.collect()
    assert _native_counters() == before


@pytest.fixture
def make_peer() -> Iterator:
    """Start peer processes on demand; all are stopped at teardown."""
    peers: list[Peer] = []

    def start(cluster_id: int, **kw: object) -> Peer:
        peer = Peer(cluster_id, **kw)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.stop()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
    """Run every async test on the standard loop and on uvloop: the engine must work on both."""
    factories = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:  # uvloop is optional: the asyncio run still covers everything
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories
