"""Engines of this process linked by the in-process transport (dxl.transport.inprocess): the
mover, resolver, layer selection and handoff run end to end by memcpy, with no child process,
and with faults injected at chosen pieces: a delay, a failure with a chosen status, the peer's
death."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import dxl
from dxl.control.hello import PeerInfo
from dxl.errors import DxlError
from dxl.handoff import Ended, FetchError, Ticket
from dxl.memory.plan import U64, Pieces
from dxl.memory.regions import RegionRegistry
from dxl.testing import KVBuffers
from dxl.transport import PeerGone
from dxl.transport.inprocess import Faults, InProcessNetwork
from dxl.transport.select import AUTO_ORDER, OPENERS, OpenContext

S = dxl.LLMStatusCode
P_ID, D_ID, P3_ID = 1, 2, 3
TENSORS, BLOCKS, BB = 4, 16, 4096
ALL = list(range(TENSORS))
SPREAD = [1, 4, 7, 10]  # blocks that are never adjacent: one piece per tensor and block


@dataclass
class Side:
    eng: dxl.Engine
    kv: KVBuffers
    cache: dxl.Cache

    def info(self) -> dxl.LLMClusterInfo:
        address = self.eng.listen_address
        assert address is not None
        info = dxl.LLMClusterInfo()
        info.remote_cluster_id = self.eng.cluster_id
        info.append_local_ip_info("127.0.0.1", 0)
        info.append_remote_ip_info(*address)
        return info


async def side(
    network: InProcessNetwork,
    cluster_id: int,
    seed: int,
    faults: Faults | None = None,
    **options: str,
) -> Side:
    eng = dxl.Engine(
        cluster_id,
        dxl.LLMRole.MIX,
        {"llm.listenIpInfo": "127.0.0.1:0", **options},
        transport_backend=network.backend(faults),
    )
    await eng.start()
    kv = KVBuffers(TENSORS, BLOCKS, BB, seed=seed, fill=seed != 0)
    key = dxl.BlocksCacheKey(cluster_id, 0)
    cache = await eng.register_blocks_cache(kv.desc(), kv.addrs, key, remote_accessible=True)
    return Side(eng, kv, cache)


class Pair:
    """A prefill (seeded) and a decode (zeroed) on one network, with the faults of the
    transfers each starts (the decode's pulls and pushes; the prefill's writes that serve a
    handoff fetch)."""

    def __init__(
        self,
        faults: Faults | None = None,
        prefill_faults: Faults | None = None,
        **decode_options: str,
    ) -> None:
        self.network = InProcessNetwork()
        self.faults = faults if faults is not None else Faults()
        self.prefill_faults = prefill_faults
        self.decode_options = decode_options

    async def __aenter__(self) -> Pair:
        self.p = await side(self.network, P_ID, seed=7, faults=self.prefill_faults)
        self.d = await side(self.network, D_ID, 0, self.faults, **self.decode_options)
        return self

    async def link(self) -> None:
        ret, rets = await self.d.eng.link_clusters([self.p.info()])
        assert ret == S.LLM_SUCCESS, rets
        assert self.d.eng.stats()["links"][P_ID]["transport"] == "inprocess"

    async def pull(self, src: list[int], dst: list[int], **kw: Any) -> None:
        await self.d.eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), self.d.cache, src, dst, **kw)

    async def push(self, src: list[int], dst: list[int], **kw: Any) -> None:
        await self.d.eng.push_blocks(dxl.BlocksCacheKey(P_ID, 0), self.d.cache, src, dst, **kw)

    async def __aexit__(self, *exc: object) -> None:
        await self.d.eng.close()
        await self.p.eng.close()


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    async with Pair() as p:
        await p.link()
        yield p


# ------------------------------------------------------------------------- the data path
def test_auto_never_picks_it() -> None:
    assert "inprocess" not in OPENERS and "inprocess" not in AUTO_ORDER


async def test_pull_and_push_by_memcpy(pair: Pair) -> None:
    await pair.pull([3, 4, 9], [0, 1, 2])
    assert pair.d.kv.matches(ALL, [0, 1, 2], 7, ALL, [3, 4, 9])
    assert pair.d.kv.untouched(ALL, list(range(3, BLOCKS)))
    # the decode pushes what it pulled into other blocks of the prefill
    await pair.push([0, 1], [14, 15])
    p = pair.p.kv
    assert p.matches(ALL, [14, 15], 7, ALL, [3, 4])
    assert p.untouched(ALL, list(range(14)))
    stats = pair.d.eng.stats()
    assert stats["pull"]["bytes"] == TENSORS * 3 * BB and stats["push"]["bytes"] == TENSORS * 2 * BB
    assert pair.faults.moved > 0  # the transfers went through the in-process transport


async def test_layer_ranges_select_the_tensors(pair: Pair) -> None:
    # 2 tensors per layer: source layer 1 (tensors 2, 3) into destination layer 0 (0, 1)
    await pair.pull([5], [6], src_layer_range=range(1, 2), dst_layer_range=range(0, 1))
    assert pair.d.kv.matches([0, 1], [6], 7, [2, 3], [5])
    assert pair.d.kv.untouched([2, 3], [6])
    await pair.push([6], [12], src_layer_range=range(0, 1), dst_layer_range=range(1, 2))
    assert pair.p.kv.matches([2, 3], [12], 7, [2, 3], [5])
    assert pair.p.kv.untouched([0, 1], [12])


async def test_a_handoff_fetch_links_and_moves_by_memcpy() -> None:
    async with Pair() as pair:  # not linked: the fetch links through the ticket's endpoint
        t = await pair.p.eng.handoff.offer("r1", pair.p.cache, [2, 3])
        await pair.d.eng.handoff.fetch(Ticket.of(t.to_dict()), pair.d.cache, [8, 9])
        assert pair.d.kv.matches(ALL, [8, 9], 7, ALL, [2, 3])
        assert pair.d.eng.stats()["links"][P_ID]["transport"] == "inprocess"
        ends = {e.request_id: e.reason for e in pair.p.eng.handoff.poll_finished()}
        assert ends == {"r1": Ended.DONE}


# ----------------------------------------------------------------------------- faults
async def test_a_delay_at_every_piece_still_completes() -> None:
    async with Pair(Faults(delay_s=0.001)) as pair:
        await pair.link()
        await pair.pull(SPREAD, SPREAD)
        assert pair.d.kv.matches(ALL, SPREAD, 7, ALL, SPREAD)
        assert pair.faults.moved == TENSORS * len(SPREAD)  # one delayed piece each


async def test_a_delay_past_the_timeout_fails_that_transfer_only() -> None:
    faults = Faults()
    async with Pair(faults, None, **{"llm.SyncKvCacheWaitTime": "50"}) as pair:
        await pair.link()
        faults.delay_s = 60.0  # a piece that would wait a minute: the 50 ms timeout ends it
        with pytest.raises(dxl.LLMException) as err:
            await pair.pull([1], [1])
        assert err.value.status_code == S.LLM_TIMEOUT
        assert pair.d.kv.untouched(ALL, [1])
        faults.delay_s = 0.0
        await pair.pull([1], [1])  # the link stayed
        assert pair.d.kv.matches(ALL, [1], 7, ALL, [1])


@pytest.mark.parametrize("status", [S.LLM_FAILED, S.LLM_SUSPECT_REMOTE_ERROR])
async def test_a_failure_at_a_piece_fails_the_transfer_with_its_status(status) -> None:
    faults = Faults(fail_at=3, fail_status=status)
    async with Pair(faults) as pair:
        await pair.link()
        with pytest.raises(dxl.LLMException) as err:
            await pair.pull(SPREAD, SPREAD)
        assert err.value.status_code == status
        moved = [(t, b) for t in ALL for b in SPREAD if pair.d.kv.matches([t], [b], 7, [t], [b])]
        assert len(moved) == 3  # the pieces before the failing one, none after
        # the engine and the link are fine: the failure was once
        assert P_ID in pair.d.eng.stats()["links"]
        await pair.pull(SPREAD, SPREAD)
        assert pair.d.kv.matches(ALL, SPREAD, 7, ALL, SPREAD)
        assert pair.d.eng.stats()["pull"]["errors"] == {status.name: 1}


async def test_the_peers_death_closes_the_link_and_later_transfers_fail_cleanly() -> None:
    faults = Faults()
    async with Pair(faults) as pair:
        p3 = await side(pair.network, P3_ID, seed=3)
        try:
            ret, rets = await pair.d.eng.link_clusters([pair.p.info(), p3.info()])
            assert ret == S.LLM_SUCCESS, rets
            await pair.pull([0], [0])
            faults.die_at = faults.moved + 2  # the third piece of the next transfer
            with pytest.raises(dxl.LLMException) as err:
                await pair.pull(SPREAD, SPREAD)
            assert err.value.status_code == S.LLM_LINK_FAILED
            assert P_ID not in pair.d.eng.stats()["links"]  # the engine closed the link
            with pytest.raises(dxl.LLMException) as err:
                await pair.pull([2], [2])
            assert err.value.status_code == S.LLM_NOT_YET_LINK
            assert pair.d.kv.untouched(ALL, [2])
            # the dead peer stays unreachable
            _, rets = await pair.d.eng.link_clusters([pair.p.info()])
            assert rets == [S.LLM_LINK_FAILED]
        finally:
            await p3.eng.close()


async def test_a_fetch_fails_with_the_injected_status_and_the_next_one_works() -> None:
    faults = Faults(fail_at=0, fail_status=S.LLM_SUSPECT_REMOTE_ERROR)
    async with Pair(prefill_faults=faults) as pair:  # the prefill writes what a fetch gets
        await pair.link()
        t = await pair.p.eng.handoff.offer("r1", pair.p.cache, [2, 3])
        with pytest.raises(FetchError) as err:
            await pair.d.eng.handoff.fetch(Ticket.of(t.to_dict()), pair.d.cache, [8, 9])
        assert err.value.status_code == S.LLM_SUSPECT_REMOTE_ERROR
        assert err.value.request_id == "r1"
        t2 = await pair.p.eng.handoff.offer("r2", pair.p.cache, [4, 5])
        await pair.d.eng.handoff.fetch(Ticket.of(t2.to_dict()), pair.d.cache, [10, 11])
        assert pair.d.kv.matches(ALL, [10, 11], 7, ALL, [4, 5])
        ends = {e.request_id: e.reason for e in pair.p.eng.handoff.poll_finished()}
        assert ends == {"r1": Ended.FAILED, "r2": Ended.DONE}


async def test_a_closed_peer_is_gone() -> None:
    async with Pair() as pair:
        await pair.link()
        await pair.p.eng.close()
        with pytest.raises(dxl.LLMException) as err:
            await pair.pull([1], [1])
        assert err.value.status_code in (S.LLM_LINK_FAILED, S.LLM_NOT_YET_LINK)
        assert pair.d.kv.untouched(ALL, [1])


# ------------------------------------------------------------------- the peer's registry
def _peer(cluster_id: int, incarnation: str) -> PeerInfo:
    return PeerInfo(
        cluster_id=cluster_id,
        role=0,
        incarnation=incarnation,
        host="",
        pid=0,
        probe=(0, 0),
        address="127.0.0.1",
        data_port=0,
        pool=None,
        heartbeat_ms=1000,
    )


CTX = OpenContext(
    cluster_id=2, pid=0, key_id=b"", key=b"", threads=1, timeout_ms=1000, deadline=0.0
)


async def test_only_what_the_peer_registered_is_read_or_written() -> None:
    network = InProcessNetwork()
    theirs = np.arange(1024, dtype=np.uint8)
    ours = np.zeros(1024, dtype=np.uint8)
    regions = RegionRegistry()
    try:
        regions.add(theirs.ctypes.data + 256, 512)  # the peer registered the middle half only
        network.backend().attach(1, "peer", regions)
        transport = await network.backend().open(_peer(1, "peer"), CTX)

        def pieces(offset: int, length: int) -> Pieces:
            return Pieces(
                np.array([ours.ctypes.data + offset], dtype=U64),
                np.array([theirs.ctypes.data + offset], dtype=U64),
                np.array([length], dtype=U64),
            )

        assert transport.read(pieces(256, 512)) == 512
        assert np.array_equal(ours[256:768], theirs[256:768])
        for offset, length in ((0, 16), (700, 100), (768, 1)):  # outside, or across its end
            with pytest.raises(DxlError) as err:
                transport.read(pieces(offset, length))
            assert transport.failure(err.value).code == S.LLM_KV_CACHE_NOT_EXIST
            push = pieces(offset, length)
            with pytest.raises(DxlError):
                transport.write(Pieces(push.src, push.dst, push.length))
        assert not ours[:256].any() and not ours[768:].any()
        assert np.array_equal(theirs, np.arange(1024, dtype=np.uint8))  # nothing written
        transport.close()
    finally:
        regions.close()


async def test_a_peer_must_be_the_cluster_it_says_and_on_the_network() -> None:
    network = InProcessNetwork()
    regions = RegionRegistry()
    try:
        backend = network.backend()
        backend.attach(1, "peer", regions)
        with pytest.raises(ValueError, match="one engine"):
            backend.attach(1, "again", regions)
        with pytest.raises(PeerGone, match="is cluster 1, not 5"):
            await network.backend().open(_peer(5, "peer"), CTX)
        with pytest.raises(PeerGone, match="not on this in-process network"):
            await network.backend().open(_peer(1, "stranger"), CTX)
        backend.detach()
        with pytest.raises(PeerGone, match="not on this in-process network"):
            await network.backend().open(_peer(1, "peer"), CTX)
    finally:
        regions.close()


def test_bad_faults_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="delay_s must be >= 0"):
        Faults(delay_s=-1)
    with pytest.raises(ValueError, match="die_at must be None or >= 0"):
        Faults(die_at=-2)


async def test_a_fetch_that_names_no_timeout_gets_the_engines_option() -> None:
    """dxl.HandoffFetchTimeoutS is the fetch's deadline when the call names none: a prefill
    whose copy stalls (until its own transfer timeout, 5 s) fails the fetch with LLM_TIMEOUT at
    the option's 0.5 s: not at the 30 s default, nor by the prefill's copy timing out."""
    network, stall = InProcessNetwork(), Faults()
    p = await side(network, P_ID, 7, stall, **{"llm.SyncKvCacheWaitTime": "5000"})
    d = await side(network, D_ID, 0, None, **{"dxl.HandoffFetchTimeoutS": "0.5"})
    try:
        t = await p.eng.handoff.offer("r-stall", p.cache, [2, 3])
        stall.delay_s = 600.0  # the prefill's copy stalls until its own 5 s timeout
        with pytest.raises(FetchError) as err:
            await d.eng.handoff.fetch(Ticket.of(t.to_dict()), d.cache, [8, 9])
        assert err.value.status_code == S.LLM_TIMEOUT
        assert "no end within 0.5 s" in str(err.value)
    finally:
        stall.delay_s = 0.0
        await d.eng.close()
        await p.eng.close()
