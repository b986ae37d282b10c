"""What real LLM-DataDist client code relies on, between processes: both sides linking to each
other with link_clusters (per-side links), and transfer_cache_async without block indices
(block 0 only)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from peer import CTX, DEFAULT_DEADLINE_S, Peer, PeerError, _handle

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
                    result = await eng.unlink(kw["comm_id"])
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


def until(check: Callable[[], bool], what: str, deadline_s: float = 20.0) -> None:
    """Wait for ``check()`` to hold, polling; fail after ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while not check():
        assert time.monotonic() < deadline, f"not within {deadline_s} s: {what}"
        time.sleep(0.02)


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
    until(lambda: p.counts() == {D_ID: 2} and d.counts() == {P_ID: 2}, "two links each side")
    assert link_clusters(p, d) == S.LLM_ALREADY_LINK
    assert link_clusters(d, p) == S.LLM_ALREADY_LINK

    # both transfer
    p.call("pull", name="kv", cluster_id=D_ID, src_blocks=[0, 1], dst_blocks=[0, 1])
    d.call("pull", name="kv", cluster_id=P_ID, src_blocks=[2, 3], dst_blocks=[2, 3])
    assert p.holds(D_SEED, [0, 1], [0, 1]) and d.holds(P_SEED, [2, 3], [2, 3])

    # one side unlinks its own link; the other side's link still carries transfers both ways
    x, y = (p, d) if first_to_unlink == "prefill" else (d, p)
    assert x.call("unlink", cluster_id=y.cluster_id, address=y.address) == S.LLM_SUCCESS
    until(
        lambda: x.counts() == {y.cluster_id: 1} and y.counts() == {x.cluster_id: 1},
        "one link left",
    )
    y_seed = D_SEED if y is d else P_SEED
    x.call("pull", name="kv", cluster_id=y.cluster_id, src_blocks=[4], dst_blocks=[4])
    y.call("push", name="kv", cluster_id=x.cluster_id, src_blocks=[5], dst_blocks=[5])
    assert x.holds(y_seed, [4, 5], [4, 5])
    assert y.call("untouched", name="kv", tensors=ALL, blocks=[4, 5, 6, 7])

    # the other side unlinks its own: no link is left, transfers fail
    assert y.call("unlink", cluster_id=x.cluster_id, address=x.address) == S.LLM_SUCCESS
    until(lambda: x.counts() == {} and y.counts() == {}, "no link left")
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
