"""The autouse leak check of conftest.py sees what it claims to: registered regions and their
bytes, tcp data servers, and exceptions that reach the test's event loop's handler."""

from __future__ import annotations

import asyncio

import numpy as np
from conftest import UNHANDLED, _live_resources
from waiting import async_wait_until

from dxl.memory.regions import RegionRegistry
from dxl.transport.tcp_server import DataServer


def test_a_registered_region_counts_with_its_bytes_until_removed() -> None:
    before = _live_resources()
    buf = np.zeros(3 * 4096, dtype=np.uint8)
    registry = RegionRegistry()
    rid = registry.add(buf.ctypes.data, buf.nbytes)
    try:
        during = _live_resources()
        assert during["registries_live"] == before["registries_live"] + 1
        assert during["regions_live"] == before["regions_live"] + 1
        assert during["bytes_registered"] == before["bytes_registered"] + buf.nbytes
    finally:
        registry.remove(rid)
        registry.close()
    assert _live_resources() == before


async def test_a_data_server_counts_until_closed() -> None:
    before = _live_resources()["tcp_servers_live"]
    registry = RegionRegistry()
    srv = await DataServer.start("127.0.0.1", 0, None, registry=registry)
    try:
        assert _live_resources()["tcp_servers_live"] == before + 1
    finally:
        await srv.close()
        registry.close()
    assert _live_resources()["tcp_servers_live"] == before


async def test_an_exception_reaching_the_loops_handler_is_recorded() -> None:
    def fail() -> None:
        raise ZeroDivisionError("from a callback")

    asyncio.get_running_loop().call_soon(fail)
    recorded = await async_wait_until(lambda: list(UNHANDLED), 10, "the callback's error")
    assert isinstance(recorded[0]["exception"], ZeroDivisionError)
    UNHANDLED.clear()  # expected here: the leak check must not fail this test for it
