"""A transfer is a value (dxl/engine/transfer.py): which operation, route, direction, pieces and
deadline. The mover plans its pieces where the copy runs, applies the inline policy to it, and
maps a transport's failure to the ``LLMException`` of the transfer's operation."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from dxl.engine.mover import Mover
from dxl.engine.resolve import Route
from dxl.engine.stats import OpStats
from dxl.engine.transfer import Blocks, Offsets, Planned, Transfer
from dxl.engine.usage import Usage
from dxl.errors import LLMException, LLMStatusCode
from dxl.memory.plan import Pieces
from dxl.transport.base import PeerGone, TransferTimeout, native_failure

U64 = np.uint64


def test_a_transfers_size_is_known_before_it_is_planned() -> None:
    rng = np.random.default_rng(3)
    bases = np.arange(4, dtype=U64) * U64(1 << 20)
    dst, src = rng.permutation(64)[:9], rng.permutation(64)[:9]
    blocks = Blocks(bases, bases + U64(1 << 30), dst, src, 256)
    assert blocks.nbytes == blocks.plan().nbytes == 4 * 9 * 256
    offsets = Offsets(bases, bases, np.array([0, 512], dtype=U64), np.array([256, 0]), 128)
    assert offsets.nbytes == offsets.plan().nbytes == 4 * 2 * 128
    ready = Pieces(bases, bases + U64(8), np.full(4, 8, dtype=U64))
    assert Planned(ready).plan() is ready and Planned(ready).nbytes == 32


class _Transport:
    """Records where and with which deadline each copy ran; fails with ``error`` if set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.caps = SimpleNamespace(inline=True, block_index=False)
        self.error = error
        self.calls: list[tuple[str, int | None, int]] = []

    def read(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        self.calls.append((threading.current_thread().name, timeout_ms, pieces.count))
        if self.error is not None:
            raise self.error
        return pieces.nbytes

    write = read
    failure = staticmethod(native_failure)


def _route(transport: _Transport, closed: list[str]) -> Route:
    link: Any = SimpleNamespace(
        usage=Usage(),
        pull=OpStats(),
        push=OpStats(),
        transport=transport,
        peer=SimpleNamespace(cluster_id=9, pid=4321, address="127.0.0.1:1"),
        close=closed.append,
    )
    local: Any = SimpleNamespace(usage=Usage())
    return Route(link, local, [SimpleNamespace(usage=Usage())])  # type: ignore[list-item]


def _blocks(n: int) -> Blocks:
    bases = np.array([1 << 20], dtype=U64)
    ids = np.arange(n)
    return Blocks(bases, bases + U64(1 << 30), ids, ids, 64)


@pytest.fixture
def mover() -> Any:
    m = Mover("dxl-test", 1, inline_bytes=1024, timeout_ms=750)
    m.start()
    yield m
    m.shutdown()


async def test_the_mover_moves_the_value_inline_only_when_marked_and_small(mover: Mover) -> None:
    transport = _Transport()
    route = _route(transport, [])
    loop_thread = threading.current_thread().name
    await mover.move(Transfer("pull_blocks", route, _blocks(4), write=False, inline=True))
    await mover.move(Transfer("pull_cache", route, _blocks(4), write=False))  # not marked
    await mover.move(Transfer("pull_blocks", route, _blocks(64), write=False, inline=True))
    await mover.move(Transfer("handoff", route, _blocks(1), write=True, timeout_ms=20))
    threads = [name for name, _, _ in transport.calls]
    assert threads[0] == loop_thread
    assert loop_thread not in threads[1:]  # unmarked, too big (4 KiB > 1 KiB), unmarked
    assert [t for _, t, _ in transport.calls] == [None, None, None, 20]  # the deadline travels
    assert mover.pull.ops == 3 and mover.push.ops == 1
    assert route.link.usage.count == route.local.usage.count == route.remote.usage.count == 0


async def test_a_transport_failure_names_the_transfers_operation(mover: Mover) -> None:
    closed: list[str] = []
    route = _route(_Transport(PeerGone("connection reset")), closed)
    with pytest.raises(LLMException) as info:
        await mover.move(Transfer("pull_blocks", route, _blocks(2), write=False))
    err = info.value
    assert err.status_code == LLMStatusCode.LLM_LINK_FAILED
    assert str(err).startswith("pull_blocks failed")
    assert "cluster 9 (pid 4321) is gone" in str(err)
    assert isinstance(err.__cause__, PeerGone)
    assert len(closed) == 1  # a gone peer's link ends
    assert mover.pull.errors == {"LLM_LINK_FAILED": 1} == route.link.pull.errors
    assert route.link.usage.count == route.local.usage.count == 0  # released all the same


async def test_a_timeout_names_the_transfers_deadline_and_keeps_the_link(mover: Mover) -> None:
    closed: list[str] = []
    route = _route(_Transport(TransferTimeout("slow")), closed)
    for deadline, shown in ((None, "(750 ms)"), (40, "(40 ms)")):
        with pytest.raises(LLMException, match=r"push_cache failed") as info:
            await mover.move(Transfer("push_cache", route, _blocks(2), True, timeout_ms=deadline))
        assert info.value.status_code == LLMStatusCode.LLM_TIMEOUT
        assert shown in str(info.value)
    assert not closed  # a slow peer keeps its link
    assert mover.push.errors == {"LLM_TIMEOUT": 2}
