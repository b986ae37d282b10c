"""What real LLM-DataDist client code relies on, between processes: both sides linking to each
other with link_clusters (per-side links), transfer_cache_async without block indices (block 0
only), and rank-table link() / query_register_mem_status() / unlink()."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from peer import CTX, DEFAULT_DEADLINE_S, Peer, PeerError, _handle
from waiting import async_wait_until, wait_until

import dxl
from dxl.testing import KVBuffers

pytestmark = [pytest.mark.multiproc, pytest.mark.cma]

S = dxl.LLMStatusCode
OK, PREPARING, FAILED = (
    dxl.RegisterMemStatus.OK,
    dxl.RegisterMemStatus.PREPARING,
    dxl.RegisterMemStatus.FAILED,
)
P_ID, D_ID = 1, 2
TENSORS, BLOCKS, BB = 4, 8, 4096
ALL = list(range(TENSORS))
P_SEED, D_SEED = 1, 2
LOCALHOST = "127.0.0.1"
LISTEN = {"llm.listenIpInfo": f"{LOCALHOST}:0"}
WAIT_S = 20.0  # deadline of a wait for an effect that should come far sooner


# ---------------------------------------------------------------------------------------------
# a Peer whose engine also runs the rank-table commands


class CommPeer(Peer):
    """A :class:`peer.Peer` that does not listen unless told to (``link()`` starts the listener)
    and also takes ``rt_link``, ``rt_status``, ``rt_unlink`` and ``link_counts``."""

    def __init__(
        self, cluster_id: int, role: str = "PROMPT", options: dict[str, str] | None = None
    ) -> None:
        opts = {"dxl.HeartbeatIntervalMs": "200", **(options or {})}
        self.cluster_id = cluster_id
        self._conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=_comm_child_main, args=(child, cluster_id, role, opts))
        self.proc.start()
        child.close()
        self.address, self.pid = self._wait_reply(DEFAULT_DEADLINE_S)

    def register(self, seed: int, model_id: int = 0, **kw: Any) -> None:
        self.call(
            "register",
            name="kv",
            num_tensors=TENSORS,
            num_blocks=BLOCKS,
            block_bytes=BB,
            seed=seed,
            model_id=model_id,
            **kw,
        )

    def counts(self) -> dict[int, int]:
        """Per linked cluster, how many links this engine holds to it (its own, the peer's)."""
        return self.call("link_counts")

    def status(self, comm_id: int) -> dxl.RegisterMemStatus:
        return dxl.RegisterMemStatus(self.call("rt_status", comm_id=comm_id))

    def holds(self, src_seed: int, dst_blocks: list[int], src_blocks: list[int]) -> bool:
        args = dict(
            tensors=ALL,
            dst_blocks=dst_blocks,
            src_seed=src_seed,
            src_tensors=ALL,
            src_blocks=src_blocks,
        )
        return bool(self.call("matches", name="kv", args=args))


def _comm_child_main(conn: Any, cluster_id: int, role: str, options: dict[str, str]) -> None:
    asyncio.run(_comm_serve(conn, cluster_id, role, options))


async def _comm_serve(conn: Any, cluster_id: int, role: str, options: dict[str, str]) -> None:
    loop = asyncio.get_running_loop()
    async with dxl.Engine(cluster_id, dxl.LLMRole[role], options) as eng:
        conn.send(("ok", (eng.listen_address, os.getpid())))
        buffers: dict[str, KVBuffers] = {}
        caches: dict[str, Any] = {}
        while True:
            cmd, kw = await loop.run_in_executor(None, conn.recv)
            try:
                if cmd == "rt_link":
                    result: Any = await eng.link(kw["name"], kw["ranks"], kw["table"])
                elif cmd == "rt_status":
                    result = int((await eng.query_register_mem_status(kw["comm_id"])).value)
                elif cmd == "rt_unlink":
                    await eng.unlink(kw["comm_id"])
                    result = None
                elif cmd == "link_counts":
                    result = {cid: v["links"] for cid, v in eng.stats()["links"].items()}
                else:
                    result = await _handle(eng, buffers, caches, cmd, kw)
            except Exception as exc:  # reported to the test, which asserts on it
                code = getattr(exc, "status_code", None)
                conn.send(
                    ("err", (type(exc).__name__, str(exc), None if code is None else int(code)))
                )
                continue
            conn.send(("ok", result))
            if cmd == "stop":
                return


@pytest.fixture
def make_comm_peer():
    peers: list[CommPeer] = []

    def start(cluster_id: int, role: str = "PROMPT", **options: str) -> CommPeer:
        peer = CommPeer(cluster_id, role, options)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.stop()


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls concurrently (each on its own thread); their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result(DEFAULT_DEADLINE_S) for f in futures]


def pull_status(peer: CommPeer, remote: int, src: list[int], dst: list[int]) -> int | None:
    """``pull_blocks`` from ``remote``'s key (remote, 0): None on success, else the status."""
    try:
        peer.call("pull", name="kv", cluster_id=remote, src_blocks=src, dst_blocks=dst)
    except PeerError as exc:
        return exc.status_code
    return None


# ---------------------------------------------------------------------------------------------
# link_clusters from both sides: per-side links


def link_clusters(peer: CommPeer, other: CommPeer) -> int:
    return peer.call("link", cluster_id=other.cluster_id, address=other.address)


@pytest.mark.parametrize(
    ("order", "first_to_unlink"),
    [
        ("at once", "prefill"),
        ("at once", "decode"),
        ("prefill first", "decode"),
        ("decode first", "prefill"),
    ],
)
def test_both_sides_link_clusters_each_unlink_ends_only_its_own(
    make_comm_peer, order: str, first_to_unlink: str
):
    p = make_comm_peer(P_ID, **LISTEN)
    d = make_comm_peer(D_ID, "DECODER", **LISTEN)
    p.register(P_SEED)
    d.register(D_SEED)
    if order == "at once":
        results = at_once(lambda: link_clusters(p, d), lambda: link_clusters(d, p))
    else:
        first, second = (p, d) if order == "prefill first" else (d, p)
        results = [link_clusters(first, second)]
        assert first.counts() == {second.cluster_id: 1}
        results.append(link_clusters(second, first))
    assert results == [S.LLM_SUCCESS, S.LLM_SUCCESS]
    wait_until(
        lambda: p.counts() == {D_ID: 2} and d.counts() == {P_ID: 2}, WAIT_S, "two links each side"
    )
    assert link_clusters(p, d) == S.LLM_ALREADY_LINK
    assert link_clusters(d, p) == S.LLM_ALREADY_LINK

    # both transfer
    p.call("pull", name="kv", cluster_id=D_ID, src_blocks=[0, 1], dst_blocks=[0, 1])
    d.call("pull", name="kv", cluster_id=P_ID, src_blocks=[2, 3], dst_blocks=[2, 3])
    assert p.holds(D_SEED, [0, 1], [0, 1]) and d.holds(P_SEED, [2, 3], [2, 3])

    # one side unlinks its own link; the other side's link still carries transfers both ways
    x, y = (p, d) if first_to_unlink == "prefill" else (d, p)
    assert x.call("unlink", cluster_id=y.cluster_id, address=y.address) == S.LLM_SUCCESS
    wait_until(
        lambda: x.counts() == {y.cluster_id: 1} and y.counts() == {x.cluster_id: 1},
        WAIT_S,
        "one link left",
    )
    y_seed = D_SEED if y is d else P_SEED
    x.call("pull", name="kv", cluster_id=y.cluster_id, src_blocks=[4], dst_blocks=[4])
    y.call("push", name="kv", cluster_id=x.cluster_id, src_blocks=[5], dst_blocks=[5])
    assert x.holds(y_seed, [4, 5], [4, 5])
    assert y.call("untouched", name="kv", tensors=ALL, blocks=[4, 5, 6, 7])

    # the other side unlinks its own: no link is left, transfers fail
    assert y.call("unlink", cluster_id=x.cluster_id, address=x.address) == S.LLM_SUCCESS
    wait_until(lambda: x.counts() == {} and y.counts() == {}, WAIT_S, "no link left")
    assert pull_status(x, y.cluster_id, [6], [6]) == S.LLM_NOT_YET_LINK
    assert pull_status(y, x.cluster_id, [6], [6]) == S.LLM_NOT_YET_LINK


# ---------------------------------------------------------------------------------------------
# transfer_cache_async without block indices


class Ready(dxl.LayerSynchronizer):
    """Every layer is ready at once."""

    def synchronize_layer(self, layer_index: int, timeout_in_millis: int | None) -> bool:
        return True


async def test_transfer_cache_async_without_indices_moves_one_stride_only(make_peer):
    """No block indices: one stride per tensor of each selected layer (a blocks source's block
    0, a contiguous source's batch ``src_batch_index``) lands at the destination's start (block
    0, or the raw address given); every other destination byte stays as it was."""
    layers, blocks, bb = 2, 4, 1024
    tensors = list(range(2 * layers))
    peer = make_peer(D_ID, role="DECODER")
    for model_id, name in enumerate(("by_addr", "by_key", "from_batch")):
        peer.call(
            "register",
            name=name,
            num_tensors=2 * layers,
            num_blocks=blocks,
            block_bytes=bb,
            seed=20 + model_id,
            model_id=model_id,
        )
    batches_id = peer.call(
        "register",
        name="batches",
        contiguous=True,
        num_tensors=2 * layers,
        num_blocks=3,
        block_bytes=bb,
        seed=30,
    )
    src_blocks = KVBuffers(2 * layers, blocks, bb, seed=9)
    src_batches = KVBuffers(2 * layers, 3, bb, seed=11)  # contiguous: 3 batches of bb bytes
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT) as eng:
        blocks_cache = await eng.register_blocks_cache(src_blocks.desc(), src_blocks.addrs)
        contiguous = await eng.register_cache(src_batches.desc(), src_batches.addrs)
        assert (await eng.link_clusters([peer.cluster_info()]))[0] == S.LLM_SUCCESS

        async def run(cache: dxl.Cache, cfg: Any) -> None:
            task = await eng.transfer_cache_async(cache, Ready(), [cfg])
            assert await task.wait_async() == [S.LLM_SUCCESS]

        # TransferConfig (raw destination addresses): the tensors' starts, so block 0
        addrs = peer.call("addrs", name="by_addr")
        await run(blocks_cache, dxl.TransferConfig(D_ID, addrs, range(0, layers)))
        args = dict(
            tensors=tensors, dst_blocks=[0], src_seed=9, src_tensors=tensors, src_blocks=[0]
        )
        assert peer.call("matches", name="by_addr", args=args)
        assert peer.call("untouched", name="by_addr", tensors=tensors, blocks=[1, 2, 3])

        # TransferWithCacheKeyConfig, source layer 1 into destination layer 0: block 0 only
        cfg = dxl.TransferWithCacheKeyConfig(dxl.BlocksCacheKey(D_ID, 1), range(1, 2), range(0, 1))
        await run(blocks_cache, cfg)
        args = dict(tensors=[0, 1], dst_blocks=[0], src_seed=9, src_tensors=[2, 3], src_blocks=[0])
        assert peer.call("matches", name="by_key", args=args)
        assert peer.call("untouched", name="by_key", tensors=[0, 1], blocks=[1, 2, 3])
        assert peer.call("untouched", name="by_key", tensors=[2, 3], blocks=range(blocks))

        # contiguous source: one batch stride. By key into a blocks cache (batch 0, the only
        # src_batch_index a BlocksCacheKey allows) lands in block 0; by raw address (batch 1)
        # at block 2 of the same cache; by CacheKeyByIdAndIndex (batch 2) in batch 1 of a
        # contiguous cache
        cfg = dxl.TransferWithCacheKeyConfig(
            dxl.BlocksCacheKey(D_ID, 2), range(0, layers), range(0, layers)
        )
        await run(contiguous, cfg)
        addrs = peer.call("addrs", name="from_batch")
        at_block_2 = [a + 2 * bb for a in addrs]
        await run(contiguous, dxl.TransferConfig(D_ID, at_block_2, range(0, layers), 1))
        args = dict(
            tensors=tensors, dst_blocks=[0, 2], src_seed=11, src_tensors=tensors, src_blocks=[0, 1]
        )
        assert peer.call("matches", name="from_batch", args=args)
        assert peer.call("untouched", name="from_batch", tensors=tensors, blocks=[1, 3])
        cfg = dxl.TransferWithCacheKeyConfig(
            dxl.CacheKeyByIdAndIndex(D_ID, batches_id, 1),
            range(0, layers),
            range(0, layers),
            src_batch_index=2,
        )
        await run(contiguous, cfg)
        args = dict(
            tensors=tensors, dst_blocks=[1], src_seed=11, src_tensors=tensors, src_blocks=[2]
        )
        assert peer.call("matches", name="batches", args=args)
        assert peer.call("untouched", name="batches", tensors=tensors, blocks=[0, 2])
        assert src_blocks.untouched(tensors, range(blocks))
        assert src_batches.untouched(tensors, range(3))


# ---------------------------------------------------------------------------------------------
# rank-table link() / query_register_mem_status() / unlink()


def free_base(count: int = 2) -> int:
    """A port base with ``count`` consecutive free ports, below the ephemeral range."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for _ in range(200):
        base = random.randrange(10000, low - count)
        socks = [socket.socket() for _ in range(count)]
        try:
            for i, s in enumerate(socks):
                s.bind((LOCALHOST, base + i))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise AssertionError("no free ports")


def rank_table(*ips: str) -> str:
    """One server, device ``i`` (rank ``i``) at ``ips[i]``; the server's id is the host IP, as
    vLLM-Ascend's connector writes it."""
    devices = [
        {"device_id": str(i), "device_ip": ip, "rank_id": str(i)} for i, ip in enumerate(ips)
    ]
    return json.dumps(
        {
            "version": "1.2",
            "server_count": "1",
            "status": "completed",
            "server_list": [{"device": devices, "server_id": LOCALHOST}],
        }
    )


RANKS = {P_ID: 0, D_ID: 1}
TABLE = rank_table(LOCALHOST, LOCALHOST)


def comm_pair(make_comm_peer, base: int, **options: str) -> tuple[CommPeer, CommPeer]:
    p = make_comm_peer(P_ID, **{"dxl.RankTableBasePort": str(base), **options})
    d = make_comm_peer(D_ID, "DECODER", **{"dxl.RankTableBasePort": str(base), **options})
    p.register(P_SEED)
    d.register(D_SEED)
    return p, d


def rt_link(peer: CommPeer, name: str = "comm", table: str = TABLE) -> int:
    return peer.call("rt_link", name=name, ranks=RANKS, table=table)


def both_ok(p: CommPeer, p_comm: int, d: CommPeer, d_comm: int) -> None:
    wait_until(lambda: p.status(p_comm) == OK and d.status(d_comm) == OK, WAIT_S, "both members OK")
    wait_until(
        lambda: p.counts() == {D_ID: 2} and d.counts() == {P_ID: 2}, WAIT_S, "a link each way"
    )


def transfer_both_ways(p: CommPeer, d: CommPeer, blocks: list[int]) -> None:
    """d pulls p's ``blocks[0]``, p pushes its ``blocks[1]``, p pulls d's ``blocks[2]``."""
    a, b, c = blocks
    d.call("pull", name="kv", cluster_id=P_ID, src_blocks=[a], dst_blocks=[a])
    p.call("push", name="kv", cluster_id=D_ID, src_blocks=[b], dst_blocks=[b])
    p.call("pull", name="kv", cluster_id=D_ID, src_blocks=[c], dst_blocks=[c])
    assert d.holds(P_SEED, [a, b], [a, b]) and p.holds(D_SEED, [c], [c])


def unlink_both(p: CommPeer, p_comm: int, d: CommPeer, d_comm: int) -> None:
    p.call("rt_unlink", comm_id=p_comm)
    d.call("rt_unlink", comm_id=d_comm)
    wait_until(lambda: p.counts() == {} and d.counts() == {}, WAIT_S, "no link left")


@pytest.mark.parametrize("order", ["prefill first", "decode first", "at once"])
def test_rank_table_members_meet_whichever_links_first(make_comm_peer, order: str):
    base = free_base()
    p, d = comm_pair(make_comm_peer, base)
    assert p.address is None and d.address is None  # link() starts the listeners
    if order == "at once":
        p_comm, d_comm = at_once(lambda: rt_link(p), lambda: rt_link(d))
    else:
        first, second = (p, d) if order == "prefill first" else (d, p)
        first_comm = rt_link(first)
        # nothing listens at the other rank's endpoint yet: the first member waits
        assert first.status(first_comm) == PREPARING
        assert first.counts() == {}
        second_comm = rt_link(second)
        p_comm, d_comm = (first_comm, second_comm) if first is p else (second_comm, first_comm)
    assert p_comm == d_comm == 1  # comm ids count from 1 per process
    both_ok(p, p_comm, d, d_comm)
    transfer_both_ways(p, d, [0, 1, 2])
    unlink_both(p, p_comm, d, d_comm)
    assert pull_status(d, P_ID, [3], [3]) == S.LLM_NOT_YET_LINK


def test_rank_table_unlink_then_link_again_with_a_new_comm(make_comm_peer):
    base = free_base()
    p, d = comm_pair(make_comm_peer, base)
    comms = at_once(lambda: rt_link(p, "first"), lambda: rt_link(d, "first"))
    both_ok(p, comms[0], d, comms[1])
    transfer_both_ways(p, d, [0, 1, 2])
    unlink_both(p, comms[0], d, comms[1])
    with pytest.raises(PeerError) as err:  # that comm is gone
        p.call("rt_unlink", comm_id=comms[0])
    assert err.value.status_code == S.LLM_PARAM_INVALID

    comms = at_once(lambda: rt_link(d, "second"), lambda: rt_link(p, "second"))
    assert comms == [2, 2]
    both_ok(p, comms[1], d, comms[0])
    transfer_both_ways(p, d, [3, 4, 5])
    unlink_both(p, comms[1], d, comms[0])


async def test_rank_table_member_that_never_comes_fails_after_link_total_time():
    base = free_base()
    opts = {"dxl.RankTableBasePort": str(base), "llm.LinkTotalTime": "1"}
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT, opts) as eng:
        comm = await eng.link("alone", RANKS, TABLE)
        assert await eng.query_register_mem_status(comm) == PREPARING
        assert eng.listen_address == (LOCALHOST, base)
        status = await async_wait_until(
            lambda s: s != PREPARING,
            WAIT_S,
            "the comm to leave PREPARING after link_total_time",
            observe=lambda: eng.query_register_mem_status(comm),
        )
        assert status == FAILED
        assert eng.stats()["links"] == {}
        await eng.unlink(comm)  # a failed comm is left like any other
        assert await eng.query_register_mem_status(comm) == FAILED  # no such comm any more


async def test_rank_table_refusals_name_the_problem():
    base = free_base()
    opts = {"dxl.RankTableBasePort": str(base)}

    def table(*devices: object) -> str:
        return json.dumps({"server_list": [{"host_ip": LOCALHOST, "device": list(devices)}]})

    bad_tables = {
        "rank 1 twice": table({"rank_id": "0"}, {"rank_id": "1"}, {"rank_id": "1"}),
        "decimal integer": table({"rank_id": "0"}, {"rank_id": "1.0"}),
        "devices must be objects": table({"device_ip": LOCALHOST}),
        "server_list entries must be objects": json.dumps({"server_list": ["x"]}),
    }
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT, opts) as eng:
        for why, bad in bad_tables.items():
            with pytest.raises(dxl.LLMException, match=why) as err:
                await eng.link("c", RANKS, bad)
            assert err.value.status_code == S.LLM_PARAM_INVALID
        with pytest.raises(dxl.LLMException, match="at most 4 members"):
            await eng.link("c", {P_ID: 0, 2: 1, 3: 2, 4: 3, 5: 4}, TABLE)
        with pytest.raises(dxl.LLMException, match=r"1\.\.127 chars"):
            await eng.link("c" * 128, RANKS, TABLE)
        with pytest.raises(ValueError):
            await eng.link("c", {P_ID: 0, D_ID: 2**32}, TABLE)
        with pytest.raises(TypeError):
            await eng.link("c", RANKS, {"server_list": []})  # type: ignore[arg-type]
        # the endpoint is taken (another engine with this IP and rank): the bind error says so
        with socket.socket() as taken:
            taken.bind((LOCALHOST, base))
            taken.listen()
            with pytest.raises(dxl.LLMException, match="already in use") as err:
                await eng.link("c", RANKS, TABLE)
            assert err.value.status_code == S.LLM_FAILED
        assert eng.listen_address is None  # every refusal left the engine as it was
        with pytest.raises(dxl.LLMException) as err:
            await eng.unlink(1)  # no comm was made
        assert err.value.status_code == S.LLM_PARAM_INVALID

    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT, {"dxl.RankTableBasePort": "65535"}) as eng:
        with pytest.raises(dxl.LLMException, match="65535 \\+ 1 > 65535"):
            await eng.link("c", RANKS, TABLE)  # rank 1 would need port 65536

    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT, {**opts, **LISTEN}) as eng:
        with pytest.raises(dxl.LLMException, match="the rank table puts its rank at") as err:
            await eng.link("c", RANKS, TABLE)  # it listens elsewhere already
        assert err.value.status_code == S.LLM_PARAM_INVALID


def test_rank_table_same_rank_in_two_comms_on_one_host_with_distinct_device_ips(make_comm_peer):
    """Two comms on one host, the same ranks and base port: distinct device IPs (loopback
    aliases here) keep their endpoints apart."""
    base = free_base()
    opts = {"dxl.RankTableBasePort": str(base)}
    members = []
    for p_id, d_id, ips in ((1, 2, ("127.0.0.2", "127.0.0.3")), (3, 4, ("127.0.0.4", "127.0.0.5"))):
        table = rank_table(*ips)
        p = make_comm_peer(p_id, **opts)
        d = make_comm_peer(d_id, "DECODER", **opts)
        p.register(p_id)
        d.register(d_id)
        ranks = {p_id: 0, d_id: 1}
        comms = [m.call("rt_link", name="comm", ranks=ranks, table=table) for m in (p, d)]
        members.append((p, d, comms))
    for p, d, comms in members:
        wait_until(
            lambda p=p, d=d, c=comms: p.status(c[0]) == OK and d.status(c[1]) == OK, WAIT_S, "OK"
        )
        d.call("pull", name="kv", cluster_id=p.cluster_id, src_blocks=[1], dst_blocks=[1])
        assert d.holds(p.cluster_id, [1], [1])
        assert d.call("untouched", name="kv", tensors=ALL, blocks=[0, *range(2, BLOCKS)])


def test_rank_table_distinct_device_ips_over_tcp(make_comm_peer):
    """Each engine listens on its own IP while its connections leave from 127.0.0.1: the peer's
    data server is reached at the IP it names in its hello, not the connection's source."""
    base = free_base()
    opts = {"dxl.RankTableBasePort": str(base), "dxl.Transport": "tcp", "llm.LinkTotalTime": "2"}
    p = make_comm_peer(P_ID, **opts)
    d = make_comm_peer(D_ID, "DECODER", **opts)
    table = rank_table("127.0.0.2", "127.0.0.3")
    comms = at_once(lambda: rt_link(p, table=table), lambda: rt_link(d, table=table))
    wait_until(lambda: PREPARING not in (p.status(comms[0]), d.status(comms[1])), WAIT_S, "settled")
    assert p.status(comms[0]) == OK and d.status(comms[1]) == OK
