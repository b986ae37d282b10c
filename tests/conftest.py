"""Shared fixtures: peer processes, a check that the native layer leaks nothing, and the fast
tier's guard that no test starts a child process."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from peer import Peer
from tiers import install_child_process_guard, mark_by_fixtures, take_child_process_attempts

from dxl import _ffi
from dxl.memory.share import SHARED


def pytest_report_header() -> list[str]:
    import importlib.metadata

    import dxl

    try:  # tests/integrations run against it (make test-vllm), or are skipped
        vllm = f"vllm {importlib.metadata.version('vllm')}"
    except importlib.metadata.PackageNotFoundError:
        vllm = "vllm not installed: tests/integrations are skipped (make test-vllm runs them)"
    return [f"dxl {dxl.__version__}, features: {dxl.features()}", vllm]


# make test-fast sets DXL_TEST_FAST=1: it runs the tests with none of the tier markers (see
# pyproject.toml), and a test that starts a child process anyway must be marked, not run there.
FAST_TIER = os.environ.get("DXL_TEST_FAST") == "1"
if FAST_TIER:
    install_child_process_guard()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_by_fixtures(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    # What exists once the tests are collected (modules, pytest's items, hypothesis, numpy)
    # lives for the whole session: freezing it keeps the gc.collect() after every test (in
    # no_native_leaks) from walking it again each time, which took most of the fast tier's time.
    gc.freeze()


def _live_resources() -> dict[str, int]:
    """What a test must give back: native regions (and their bytes), peer handles, ops in
    flight, tcp data servers, and shared spans."""
    c = _ffi.counters()
    return {
        "regions_live": c["regions_live"],
        "registries_live": c["registries_live"],
        "bytes_registered": c["bytes_registered"],
        "peers_open": c["peers_open"],
        "ops_inflight": c["ops_inflight"],
        "tcp_servers_live": int(_ffi.lib.dxl_tcp_servers_live()),
        "shared_spans": SHARED.live(),  # memfds of dxl.ShareRegistered (Python side)
    }


# Every loop an async test runs on comes from pytest_asyncio_loop_factories below, which
# installs this handler: what reaches it (a task's exception nobody retrieved, a callback that
# raised, an error while the loop shuts down) is recorded and fails the test.
UNHANDLED: list[dict[str, Any]] = []


def _record_unhandled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    UNHANDLED.append(context)
    loop.default_exception_handler(context)  # still logged as usual


def _describe(context: dict[str, Any]) -> str:
    exc = context.get("exception")
    what = f"{type(exc).__name__}: {exc}" if exc is not None else "no exception"
    return f"{context.get('message', '?')} ({what})"


@pytest.fixture(autouse=True)
def no_native_leaks() -> Iterator[None]:
    """Every test must leave as many live regions and registries, registered bytes, in-flight
    ops, tcp data servers and shares as it found, and no exception may reach an event loop's
    exception handler during it.

    It is set up before pytest-asyncio's runner (autouse fixtures come first), so its teardown
    runs after the test's loop was shut down: errors raised while the runner cancels leftover
    tasks are seen too, and gc.collect() reports tasks whose exception nobody retrieved."""
    UNHANDLED.clear()
    take_child_process_attempts()
    before = _live_resources()
    yield
    gc.collect()
    after = _live_resources()
    unhandled = [_describe(c) for c in UNHANDLED]
    UNHANDLED.clear()
    # also when the test caught the guard's exception (or a thread of it did)
    spawned = take_child_process_attempts()
    assert not spawned, (
        f"the fast tier starts no child process, but this test tried: {spawned}; "
        "mark it multiproc (or netns, soak)"
    )
    leaked = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not leaked, f"leaked (before, after): {leaked}"
    assert not unhandled, f"exceptions reached the event loop's handler: {unhandled}"


@pytest.fixture
def make_peer() -> Iterator:
    """Start peer processes on demand; all are stopped at teardown."""
    peers: list[Peer] = []

    def start(cluster_id: int, **kw: Any) -> Peer:
        peer = Peer(cluster_id, **kw)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.stop()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
    """Run every async test on the standard loop and on uvloop: the engine must work on both."""
    factories = {"asyncio": _recording(asyncio.new_event_loop)}
    try:
        import uvloop
    except ImportError:  # uvloop is optional: the asyncio run still covers everything
        return factories
    factories["uvloop"] = _recording(uvloop.new_event_loop)
    return factories


def _recording(factory: Callable[[], asyncio.AbstractEventLoop]) -> Callable[[], Any]:
    """``factory`` whose loops send what reaches their exception handler to UNHANDLED."""

    def new_loop() -> asyncio.AbstractEventLoop:
        loop = factory()
        loop.set_exception_handler(_record_unhandled)
        return loop

    return new_loop
