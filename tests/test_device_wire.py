"""A DEVICE cache is advertised with its device (wire v5), so a peer's NIXL prepares it under
the device the owner registered it on; host memory says 0. No NIXL or GPU needed: the book and
the registry entry are pure."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dxl.control import wire
from dxl.control.messages import RegAdd
from dxl.engine.book import CacheBook
from dxl.engine.registry import RemoteCache
from dxl.memory.layout import Layout
from dxl.memory.regions import RegionRegistry
from dxl.types import CacheDesc, DataType, Placement


@pytest.mark.parametrize(("placement", "device"), [(Placement.DEVICE, 6), (Placement.HOST, 0)])
def test_an_advertised_cache_carries_its_device(placement: Placement, device: int) -> None:
    regions = RegionRegistry()
    book = CacheBook(1024, regions, None, device_id=6)
    desc = CacheDesc(2, [4, 4096], DataType.DT_UINT8, placement)
    layout = Layout(np.array([1 << 40, (1 << 40) + (1 << 20)], dtype=np.uint64), 16384, 4, True)
    try:
        advertised = _advertise(book, desc, layout)
    finally:
        regions.close()
    assert advertised["device"] == device
    frame = wire.encode(RegAdd(rid=1, cache=advertised))  # checked on the way in, as a peer does
    received = wire.decode(frame[4:])
    assert isinstance(received, RegAdd)
    remote = RemoteCache.from_wire(received.cache)
    assert (remote.placement, remote.device) == (placement, device)


def _advertise(book: CacheBook, desc: CacheDesc, layout: Layout) -> dict[str, Any]:
    entry = book.add(
        desc,
        layout,
        owner=object(),
        remote_accessible=True,
        model_id=None,
        bindings=[],
        pool_addrs=None,
        shared=[],
    )
    return entry.wire_entry()
