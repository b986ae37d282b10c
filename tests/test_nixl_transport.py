"""The nixl transport (``dxl.Transport=nixl``, the extra ``dxl[nixl]``) on host memory: what
only nixl does. The transport-generic tests (transfers, layer ranges, the handoff in both modes,
the sync facade, peer death, unregistering under a transfer; tests/transports.py) run over nixl
too under ``make test-nixl``.

Two engines of this process where NIXL allows it (two agents with distinct names), a child
process where a peer must die or be measured apart. This machine has no RDMA device, so UCX
emulates RMA (tcp, cma, shared memory) and the tests allow that with ``dxl.NixlAllowEmulated``;
one test checks it is refused without. ``make test-nixl`` runs them in ``.venv-nixl``; without
nixl installed they skip.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from waiting import async_wait_until

import dxl
from dxl.testing import KVBuffers
from dxl.transport import nixl as nixl_mod
from dxl.transport import nixl_notifs
from dxl.transport.nixl import hardware_rma, nixl_version

pytestmark = [
    pytest.mark.nixl,
    pytest.mark.skipif(nixl_version() is None, reason="nixl is not installed (make test-nixl)"),
]

S = dxl.LLMStatusCode
LAYERS = 4
TENSORS = 2 * LAYERS
BLOCKS = 32
BB = 4096
P_ID, D_ID = 1, 2
ALL = list(range(TENSORS))
PREFILL_SEED, DECODE_SEED = 7, 99
TIMEOUT_MS = 3000
NIXL = {
    "dxl.Transport": "nixl",
    "dxl.NixlAllowEmulated": "1",
    "llm.SyncKvCacheWaitTime": str(TIMEOUT_MS),
}
IDLE_S = 10.0  # the idle measurement's window
IDLE_MAX = 0.05  # of one core


def fresh_log_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handshake's rate-limited log starts empty, so this test sees its own lines (earlier
    refusals in this process may have used up the window)."""
    from dxl.engine import handshake

    monkeypatch.setattr(handshake.limited, "_windows", {})


def info_of(eng: dxl.Engine) -> dxl.LLMClusterInfo:
    assert eng.listen_address is not None
    info = dxl.LLMClusterInfo()
    info.remote_cluster_id = eng.cluster_id
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info(*eng.listen_address)
    return info


@dataclass
class Pair:
    """A prefill engine (listening; its cache filled with PREFILL_SEED) and a decode engine (its
    cache DECODE_SEED), both over nixl, the decode linked to the prefill."""

    p: dxl.Engine
    d: dxl.Engine
    pc: dxl.Cache
    dc: dxl.Cache
    src: KVBuffers
    dst: KVBuffers


@asynccontextmanager
async def pair(options: dict[str, str] | None = None, *, link: bool = True) -> AsyncIterator[Pair]:
    opts = {**NIXL, **(options or {})}
    listen = {"llm.listenIpInfo": "127.0.0.1:0"}
    src = KVBuffers(TENSORS, BLOCKS, BB, seed=PREFILL_SEED)
    dst = KVBuffers(TENSORS, BLOCKS, BB, seed=DECODE_SEED)
    async with (
        dxl.Engine(P_ID, dxl.LLMRole.PROMPT, {**opts, **listen}) as p,
        dxl.Engine(D_ID, dxl.LLMRole.DECODER, {**opts, **listen}) as d,
    ):
        pc = await p.register_blocks_cache(
            src.desc(), src.addrs, dxl.BlocksCacheKey(P_ID, 0), remote_accessible=True
        )
        dc = await d.register_blocks_cache(
            dst.desc(), dst.addrs, dxl.BlocksCacheKey(D_ID, 0), remote_accessible=True
        )
        if link:
            ret, rets = await d.link_clusters([info_of(p)], timeout=10_000)
            assert ret == S.LLM_SUCCESS, rets
            assert d.stats()["links"][P_ID]["transport"] == "nixl"
        yield Pair(p, d, pc, dc, src, dst)


def _count_requests(agent: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which NIXL call made each transfer: "by_index" (make_prepped_xfer on the lists prepared
    per cache) or "pieces" (initialize_xfer of planned pieces)."""
    calls: list[str] = []
    for method, kind in (("make_prepped_xfer", "by_index"), ("initialize_xfer", "pieces")):
        real = getattr(agent, method)

        def spy(*args: Any, _real: Any = real, _kind: str = kind, **kw: Any) -> Any:
            calls.append(_kind)
            return _real(*args, **kw)

        monkeypatch.setattr(agent, method, spy)
    return calls


async def test_a_block_request_is_one_prepared_transfer(monkeypatch):
    """Bytes, layer ranges, the handoff, the sync facade and failures over nixl are the
    transport-generic tests' (tests/transports.py; make test-nixl runs them over nixl). Here:
    what only nixl does. A pull or push of whole blocks is one make_prepped_xfer on the lists
    prepared per cache, not descriptors built per call."""
    async with pair() as x:
        assert x.d._nixl is not None
        calls = _count_requests(x.d._nixl.agent, monkeypatch)
        src_blocks, dst_blocks = [5, 6, 7, 30, 2], [0, 1, 2, 9, 31]
        await x.d.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), x.dc, src_blocks, dst_blocks)
        assert x.dst.matches(ALL, dst_blocks, PREFILL_SEED, ALL, src_blocks)
        await x.d.push_blocks(dxl.BlocksCacheKey(P_ID, 0), x.dc, [10, 11], [20, 21])
        assert x.src.matches(ALL, [20, 21], DECODE_SEED, ALL, [10, 11])
        assert calls == ["by_index", "by_index"]  # one prepared transfer per request


async def test_a_cache_registered_after_the_link_is_reachable_at_once():
    """A cache the prefill registers once linked: its NIXL registration reaches the decode
    (data_info before reg_add), so a pull from it works at once."""
    async with pair() as x:
        late = KVBuffers(TENSORS, BLOCKS, BB, seed=55)
        await x.p.register_blocks_cache(
            late.desc(), late.addrs, dxl.BlocksCacheKey(P_ID, 1), remote_accessible=True
        )
        await x.d.pull_blocks(dxl.BlocksCacheKey(P_ID, 1), x.dc, [8], [12])
        assert x.dst.matches(ALL, [12], 55, ALL, [8])


class _AllReady(dxl.LayerSynchronizer):
    def synchronize_layer(self, layer_index: int, timeout_in_millis: int | None) -> bool:
        return True


async def test_transfer_cache_async_pushes_layers():
    async with pair() as x:
        cfg = dxl.TransferWithCacheKeyConfig(
            dxl.BlocksCacheKey(D_ID, 0), range(0, LAYERS), range(0, LAYERS)
        )
        task = await x.p.transfer_cache_async(x.pc, _AllReady(), [cfg], [4, 5], [14, 15])
        assert await task.wait_async() == [S.LLM_SUCCESS]
        assert x.dst.matches(ALL, [14, 15], PREFILL_SEED, ALL, [4, 5])
        assert x.dst.untouched(ALL, [13, 16])


async def test_forcing_nixl_without_rdma_needs_the_option(caplog, monkeypatch):
    fresh_log_windows(monkeypatch)
    if hardware_rma():
        pytest.skip(f"this host has RDMA devices {hardware_rma()}: nothing is emulated")
    caplog.set_level(logging.ERROR, logger="dxl")
    async with pair({"dxl.NixlAllowEmulated": "0"}, link=False) as x:
        ret, rets = await x.d.link_clusters([info_of(x.p)], timeout=10_000)
        assert ret == S.LLM_LINK_FAILED and rets == [S.LLM_LINK_FAILED]
        assert "no RDMA device" in caplog.text
        assert "dxl.NixlAllowEmulated" in caplog.text
        assert x.d.stats()["links"] == {}


def _cpu_s(pid: int | None = None) -> float:
    """CPU time (user + system) of this process, or of ``pid`` from /proc/<pid>/stat."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _prefill_child(make_peer: Any, options: dict[str, str] | None = None) -> Any:
    peer = make_peer(P_ID, options={**NIXL, **(options or {})})
    peer.call(
        "register",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BB,
        seed=PREFILL_SEED,
        model_id=0,
    )
    return peer


@asynccontextmanager
async def decode_linked_to(
    peer: Any, options: dict[str, str] | None = None
) -> AsyncIterator[tuple[dxl.Engine, dxl.Cache, KVBuffers]]:
    dst = KVBuffers(TENSORS, BLOCKS, BB, seed=DECODE_SEED)
    async with dxl.Engine(D_ID, dxl.LLMRole.DECODER, {**NIXL, **(options or {})}) as d:
        dc = await d.register_blocks_cache(dst.desc(), dst.addrs)
        ret, rets = await d.link_clusters([peer.cluster_info()], timeout=10_000)
        assert ret == S.LLM_SUCCESS, rets
        assert d.stats()["links"][P_ID]["transport"] == "nixl"
        yield d, dc, dst


@pytest.mark.multiproc
async def test_an_idle_linked_pair_uses_under_5_percent_of_a_core(make_peer):
    """The measurement ``make test-nixl`` reports: a linked, warm pair (this process and a
    child), nothing moving, over IDLE_S seconds; each process at most IDLE_MAX of a core."""
    peer = _prefill_child(make_peer)
    async with decode_linked_to(peer) as (d, dc, _):
        await d.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), dc, [1], [2])  # warm, in use once
        ours, theirs, t0 = _cpu_s(), _cpu_s(peer.proc.pid), time.monotonic()
        await asyncio.sleep(IDLE_S)  # the measurement window, not a synchronisation
        wall = time.monotonic() - t0
        ours = (_cpu_s() - ours) / wall
        theirs = (_cpu_s(peer.proc.pid) - theirs) / wall
        print(f"\nnixl idle linked pair over {wall:.1f} s: decode (this process) "
              f"{100 * ours:.2f} % of a core, prefill (child) {100 * theirs:.2f} %")  # fmt: skip
        assert ours <= IDLE_MAX and theirs <= IDLE_MAX
        assert P_ID in d.stats()["links"]


async def test_peer_info_from_a_stranger_agent_is_refused():
    """Metadata on a link must be its peer agent's: another agent's is refused before NIXL
    loads it (the link stays, and no stranger agent is added)."""
    async with pair() as x:
        link = x.d._links.own(P_ID)
        assert link is not None
        other = nixl_mod.NixlHost("dxl-99-x", [x.src.addrs[0], 0], allow_emulated=True, device_id=0)
        try:
            with pytest.raises(nixl_mod.NixlFailed, match="another agent"):
                link.transport.peer_info(other.metadata())
        finally:
            other.close()
        with pytest.raises(nixl_mod.NixlFailed, match="base64"):
            link.transport.peer_info("not base64!")
        await x.d.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), x.dc, [1], [2])
        assert x.dst.matches(ALL, [2], PREFILL_SEED, ALL, [1])


async def test_only_remotely_accessible_caches_are_in_the_metadata_peers_get():
    """The keys a peer receives cover the remotely accessible caches (and the probe word) only:
    the peer's NIXL refuses to address a cache registered without remote access."""
    async with pair() as x:
        private = KVBuffers(TENSORS, BLOCKS, BB, seed=3)
        await x.d.register_blocks_cache(private.desc(), private.addrs, remote_accessible=False)
        late = KVBuffers(TENSORS, BLOCKS, BB, seed=4)  # registered after the link: data_info
        await x.d.register_blocks_cache(late.desc(), late.addrs, remote_accessible=True)
        p_host, d_host = x.p._nixl, x.d._nixl
        assert p_host is not None and d_host is not None
        agent = p_host.agent
        for addr in (x.dst.addrs[1], late.addrs[0]):
            agent.prep_xfer_dlist(d_host.name, [(addr, BB, 0)], "DRAM").release()
        with pytest.raises(Exception, match="NIXL_ERR_NOT_FOUND"):
            agent.prep_xfer_dlist(d_host.name, [(private.addrs[0], BB, 0)], "DRAM")


@pytest.mark.multiproc
async def test_a_stuck_transfer_fails_at_its_deadline_and_the_link_goes_on(make_peer, monkeypatch):
    """UCX over tcp only (``UCX_TLS=^cma``, both processes): a transfer needs the target's
    progress thread, so with the prefill SIGSTOPped it never completes (NIXL has no timeout).
    dxl fails the pull with LLM_TIMEOUT at the deadline but holds the NIXL transfer until
    NIXL ends it (releasing it would let the late reply land in memory that may be gone); the
    link stays, once the prefill runs again the held transfer ends and is released, and the
    next pull works."""
    monkeypatch.setenv("UCX_TLS", "^cma")  # read by both agents (the child inherits it)
    peer = _prefill_child(make_peer)
    async with decode_linked_to(peer, {"llm.SyncKvCacheWaitTime": "1000"}) as (d, dc, dst):
        await d.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), dc, [1], [2])
        peer.kill(signal.SIGSTOP)
        try:
            with pytest.raises(dxl.LLMException) as err:
                await d.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), dc, [3, 4], [5, 6])
            assert err.value.status_code == S.LLM_TIMEOUT
            assert "1000 ms" in str(err.value) and "holds it" in str(err.value)
            host = d._nixl
            assert host is not None and host.stuck() == 1  # held, not released
            assert host.transfers_in_flight == 1  # and counted as still in flight
        finally:
            peer.kill(signal.SIGCONT)
        await async_wait_until(  # the late reply ends it; the engine's watch releases it
            lambda n: n == 0, 20, "the held transfer to end", observe=host.reap
        )
        assert host.transfers_in_flight == 0
        assert P_ID in d.stats()["links"]
        await d.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), dc, [3, 4], [5, 6])
        assert dst.matches(ALL, [5, 6], PREFILL_SEED, ALL, [3, 4])


@pytest.mark.multiproc
async def test_unregister_waits_for_the_transfer_in_flight(make_peer, monkeypatch):
    """A pull held in flight (tcp-only UCX, the prefill stopped): unregistering its destination
    cache waits for it, and the cache leaves the NIXL agent only after the pull ended."""
    monkeypatch.setenv("UCX_TLS", "^cma")
    peer = _prefill_child(make_peer)
    async with decode_linked_to(peer, {"llm.SyncKvCacheWaitTime": "30000"}) as (d, dc, dst):
        host = d._nixl
        await d.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), dc, [1], [2])
        assert host is not None and dc.cache_id in host.registered
        entry = d._book.find(dc.cache_id)
        assert entry is not None
        peer.kill(signal.SIGSTOP)
        try:
            pull = asyncio.create_task(
                d.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), dc, [5, 6], [7, 8])
            )
            await async_wait_until(
                lambda: entry.usage.count > 0 and host.transfers_in_flight > 0,
                10,
                "the pull posted to NIXL",
            )
            unregister = asyncio.create_task(d.unregister_cache(dc.cache_id))
            for _ in range(50):  # let it get as far as it can: it must wait for the pull
                await asyncio.sleep(0)
            assert not unregister.done() and not pull.done()
            assert dc.cache_id in host.registered
        finally:
            peer.kill(signal.SIGCONT)
        await asyncio.wait_for(pull, 30)
        await asyncio.wait_for(unregister, 30)
        assert dst.matches(ALL, [7, 8], PREFILL_SEED, ALL, [5, 6])
        assert dc.cache_id not in host.registered


@pytest.mark.multiproc
def test_nixl_is_imported_only_by_the_first_nixl_link():
    """``import dxl`` and an engine configured for nixl import nothing of NIXL (its wheel loads
    CUDA libraries); ``dxl info`` reports it without importing it either."""
    code = (
        "import asyncio, json, subprocess, sys\n"
        "import dxl\n"
        "from dxl.transport.nixl import nixl_info\n"
        "async def main():\n"
        "    async with dxl.Engine(1, dxl.LLMRole.PROMPT, {'dxl.Transport': 'nixl'}):\n"
        "        pass\n"
        "asyncio.run(main())\n"
        "info = nixl_info()\n"
        "print(json.dumps({'imported': 'nixl' in sys.modules, 'info': info}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["imported"] is False
    assert result["info"]["installed"] == nixl_version()
    assert any("cma" in tls for tls in result["info"]["ucx_transports"].values())


@pytest.mark.parametrize(("prefill", "decode"), [("nixl", "tcp"), ("tcp", "nixl")])
async def test_a_link_whose_ends_disagree_on_nixl_is_refused_at_once(
    prefill, decode, caplog, monkeypatch
):
    fresh_log_windows(monkeypatch)
    caplog.set_level(logging.WARNING, logger="dxl")
    listen = {"llm.listenIpInfo": "127.0.0.1:0"}
    async with (
        dxl.Engine(P_ID, dxl.LLMRole.PROMPT, {**NIXL, **listen, "dxl.Transport": prefill}) as p,
        dxl.Engine(D_ID, dxl.LLMRole.DECODER, {**NIXL, **listen, "dxl.Transport": decode}) as d,
    ):
        ret, rets = await d.link_clusters([info_of(p)], timeout=10_000)
        assert (ret, rets) == (S.LLM_LINK_FAILED, [S.LLM_LINK_FAILED])
        assert "set it on both engines" in caplog.text
        assert d.stats()["links"] == {}
        await async_wait_until(lambda: p.stats()["links"] == {}, 10, "no link on the prefill")


def _send_notifs(agent: Any, to: str, count: int, size: int) -> None:
    """``count`` notifications of ``size`` bytes from ``agent`` to agent ``to`` (the callers
    then wait, on a predicate, for the receiving engine to drain them)."""
    msg = b"n" * size
    for _ in range(count):
        agent.send_notif(to, msg)


async def test_notifications_a_peer_sends_are_drained_and_dropped():
    """A linked peer's agent sends many notifications, in batches each under the per-window
    limit but together far past it: the decode drains and drops every one (it holds only their
    counts, NIXL's queue ends empty), the link stays and its transfers work."""
    batch, batches, size = 1000, 5, 4096
    assert batch <= nixl_notifs.NOTIF_LIMIT < batch * batches
    async with pair() as x:
        p_host, d_host = x.p._nixl, x.d._nixl
        assert p_host is not None and d_host is not None
        for n in range(1, batches + 1):
            _send_notifs(p_host.agent, d_host.name, batch, size)
            await async_wait_until(
                lambda n=n: d_host.notifs.snapshot()["dropped"] >= n * batch,
                30,
                f"the decode to drain batch {n}",
            )
        await x.d.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), x.dc, [1], [2])  # drains too
        snap = d_host.notifs.snapshot()
        print(f"\nnixl notifications: {snap}")
        assert snap["dropped"] == batch * batches
        assert snap["dropped_bytes"] == batch * batches * size
        assert snap["floods"] == 0
        assert snap["senders_in_window"] <= nixl_notifs.MAX_SENDERS
        agent = d_host.agent
        assert agent.get_new_notifs() == {}  # nothing left queued in NIXL
        assert agent.notifs == {}  # the wrapper's own map: dxl never fills it
        assert x.dst.matches(ALL, [2], PREFILL_SEED, ALL, [1])
        assert P_ID in x.d.stats()["links"]


@pytest.mark.parametrize(("limit", "value", "count", "size"), [
    ("NOTIF_LIMIT", 20, 2000, 64),  # too many
    ("NOTIF_BYTES_LIMIT", 64 << 10, 200, 16 << 10),  # few, too large
])  # fmt: skip
async def test_a_peer_that_floods_notifications_is_unlinked(
    limit, value, count, size, caplog, monkeypatch
):
    """More notifications, or bytes of them, than the limit in one window: the decode closes
    that link (logged, rate-limited), every notification is still dropped, and the engine goes
    on: it links again and pulls."""
    monkeypatch.setattr(nixl_notifs, limit, value)
    caplog.set_level(logging.WARNING, logger="dxl")
    async with pair() as x:
        p_host, d_host = x.p._nixl, x.d._nixl
        assert p_host is not None and d_host is not None
        assert count < nixl_notifs.NOTIF_LIMIT or count * size < nixl_notifs.NOTIF_BYTES_LIMIT
        _send_notifs(p_host.agent, d_host.name, count, size)
        await async_wait_until(lambda: P_ID not in x.d.stats()["links"], 30, "the flooder cut")
        assert d_host.notifs.snapshot()["floods"] >= 1
        assert "notifications" in caplog.text and "closing the link" in caplog.text
        await async_wait_until(lambda: x.p.stats()["links"] == {}, 20, "the prefill's end gone")
        ret, rets = await x.d.link_clusters([info_of(x.p)], timeout=10_000)
        assert ret == S.LLM_SUCCESS, rets
        await x.d.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), x.dc, [4], [5])
        assert x.dst.matches(ALL, [5], PREFILL_SEED, ALL, [4])
