"""The autouse leak check of conftest.py sees what it claims to: registered regions and their
bytes, tcp data servers, and exceptions that reach the test's event loop's handler."""

from __future__ import annotations

import asyncio

import numpy as np
from conftest import UNHANDLED, _live_resources
from waiting import async_wait_until

from dxl import _ffi
from dxl.transport.tcp_server import DataServer


def test_a_registered_region_counts_with_its_bytes_until_removed() -> None:
    before = _live_resources()
    buf = np.zeros(3 * 4096, dtype=np.uint8)
    rid = _ffi.ffi.new("uint64_t *")
    _ffi.check(_ffi.lib.dxl_region_add(buf.ctypes.data, buf.nbytes, rid), "register")
    try:
        during = _live_resources()
        assert during["regions_live"] == before["regions_live"] + 1
        assert during["bytes_registered"] == before["bytes_registered"] + buf.nbytes
    finally:
        _ffi.check(_ffi.lib.dxl_region_remove(rid[0]), "unregister")
    assert _live_resources() == before


async def test_a_data_server_counts_until_closed() -> None:
    before = _live_resources()["tcp_servers_live"]
    srv = await DataServer.start("127.0.0.1", 0, None)
    try:
        assert _live_resources()["tcp_servers_live"] == before + 1
    finally:
        await srv.close()
    assert _live_resources()["tcp_servers_live"] == before


async def test_an_exception_reaching_the_loops_handler_is_recorded() -> None:
    def fail() -> None:
        raise ZeroDivisionError("from a callback")

    asyncio.get_running_loop().call_soon(fail)
    recorded = await async_wait_until(lambda: list(UNHANDLED), 10, "the callback's error")
    assert isinstance(recorded[0]["exception"], ZeroDivisionError)
    UNHANDLED.clear()  # expected here: the leak check must not fail this test for it
