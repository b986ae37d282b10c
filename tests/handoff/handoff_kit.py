"""Helpers of the request handoff tests: a decode Engine in the test process (on the loop the test
runs on: asyncio, then uvloop) and prefill engines in child processes (``tests/peer.py``, on the
same kind of loop).

Buffers carry ``dxl.testing.KVBuffers`` patterns: the prefill's blocks ``PREFILL_SEED``, the
decode's ``DECODE_SEED``, and blocks reused after an abort ``NEW_SEED`` (``tests/patterns.py``),
so every word of a destination says where it came from.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peer import Peer
from waiting import async_wait_until

import dxl
from dxl.handoff import Finished, Ticket
from dxl.testing import KVBuffers

P_ID, P2_ID, D_ID = 1, 3, 2
PREFILL_SEED, DECODE_SEED, NEW_SEED = 11, 22, 0xBEEF

# small: most tests; big: enough layers that an abort or a kill lands mid-transfer
SMALL = {"num_tensors": 8, "num_blocks": 16, "block_bytes": 4096}
BIG = {"num_tensors": 128, "num_blocks": 8, "block_bytes": 128 << 10}  # 64 layers, 128 MiB


def loop_kind() -> str:
    """The kind of loop the calling test runs on: children run on the same kind."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def layers_of(layout: dict[str, int]) -> int:
    return layout["num_tensors"] // 2


def prefill_starter(make_peer: Callable[..., Peer]) -> Callable[..., Peer]:
    """``start(cluster_id=P_ID, layout=SMALL, seed=PREFILL_SEED, **peer_kw)``: a prefill child
    on the calling test's kind of loop, with ``layout`` registered as cache "kv" (remotely
    accessible). (No conftest.py here: it would shadow tests/conftest.py, which other tests
    import as ``conftest``.)"""

    def start(
        cluster_id: int = P_ID,
        layout: dict[str, int] = SMALL,
        seed: int = PREFILL_SEED,
        **kw: Any,
    ) -> Peer:
        peer = make_peer(cluster_id, loop=loop_kind(), **kw)
        peer.call("register", name="kv", seed=seed, model_id=0, **layout)
        return peer

    return start


@dataclass
class Decode:
    """The decode engine of a test, with its cache ``kv`` over ``buf``."""

    eng: dxl.Engine
    buf: KVBuffers
    cache: dxl.Cache

    @property
    def h(self) -> Any:
        return self.eng.handoff

    def holds(self, dst: Sequence[int], seed: int, src: Sequence[int]) -> bool:
        """Every tensor of ``dst`` holds blocks ``src`` of the buffer of ``seed``."""
        tensors = range(self.buf.num_tensors)
        return self.buf.matches(tensors, dst, seed, tensors, src)

    def untouched(self, blocks: Sequence[int]) -> bool:
        return self.buf.untouched(range(self.buf.num_tensors), blocks)


@contextlib.asynccontextmanager
async def decode_engine(
    layout: dict[str, int] = SMALL,
    cluster_id: int = D_ID,
    options: dict[str, str] | None = None,
) -> AsyncIterator[Decode]:
    """A listening decode engine in this process, its cache registered remotely accessible."""
    opts = {"llm.listenIpInfo": "127.0.0.1:0", "dxl.HeartbeatIntervalMs": "200"}
    opts.update(options or {})
    buf = KVBuffers(
        layout["num_tensors"], layout["num_blocks"], layout["block_bytes"], seed=DECODE_SEED
    )
    async with dxl.Engine(cluster_id, dxl.LLMRole.DECODER, opts) as eng:
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs, remote_accessible=True)
        yield Decode(eng, buf, cache)


class Ends:
    """The ``Finished`` records an engine reported (a child's, polled; or this process's),
    collected per offer id, so a test can assert each offer ended exactly once."""

    def __init__(self, peer: Peer | None = None, engine: dxl.Engine | None = None) -> None:
        self.peer = peer
        self.engine = engine
        self.records: list[dict[str, Any]] = []

    async def poll(self) -> list[dict[str, Any]]:
        if self.peer is not None:
            new = await self.peer.aio("finished")
        else:
            assert self.engine is not None
            new = [_as_dict(f) for f in self.engine.handoff.poll_finished()]
        self.records.extend(new)
        return self.records

    def of(self, ticket: str | Ticket) -> list[dict[str, Any]]:
        offer_id = Ticket.of(ticket).offer_id
        return [r for r in self.records if r["offer_id"] == offer_id]

    async def wait_end(self, ticket: str | Ticket, deadline_s: float = 20) -> dict[str, Any]:
        """The one record of ``ticket``'s offer, once it is reported."""
        records = await async_wait_until(
            lambda _: self.of(ticket),
            deadline_s,
            f"the end of offer {Ticket.of(ticket).offer_id}",
            observe=self.poll,
        )
        del records
        [record] = self.of(ticket)
        return record


TRIES = 10  # attempts at landing a race (an abort mid-transfer...) before a test gives up


async def retry_until(
    one_try: Callable[[int], Awaitable[bool]], what: str, tries: int = TRIES
) -> int:
    """Run ``one_try(attempt)`` until it returns True (the race it sets up was hit, and it
    asserted what it must); returns the attempts it took; fails the test after ``tries``."""
    for attempt in range(tries):
        if await one_try(attempt):
            return attempt + 1
    raise AssertionError(f"{what} never happened in {tries} tries: the race was never hit")


def _as_dict(f: Finished) -> dict[str, Any]:
    return {
        "request_id": f.request_id,
        "offer_id": f.offer_id,
        "kind": f.kind,
        "reason": f.reason.value,
        "peer": f.peer,
        "block_ids": f.block_ids,
        "detail": f.detail,
    }
