"""The engine over the tcp transport: byte-exact pull/push, authenticated links, transport
choice, a peer without a data server, and failures on the network path (loopback)."""

from __future__ import annotations

import logging
import signal
import socket
import time

import pytest
from peer import PeerError

import dxl
from dxl.control.auth import HELLO_BYTES
from dxl.testing import KVBuffers

pytestmark = [pytest.mark.multiproc]

S = dxl.LLMStatusCode
TENSORS, BLOCKS, BB = 4, 64, 16384
P_ID, D_ID = 1, 2
ALL = list(range(TENSORS))
TCP = {"dxl.Transport": "tcp"}


def prefill(make_peer, options=None, cluster_id=P_ID, seed=7):
    peer = make_peer(cluster_id, options={**TCP, **(options or {})})
    peer.call(
        "register",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BB,
        seed=seed,
        model_id=0,
    )
    return peer


async def decoder(options=None, listen=False):
    opts = {**TCP, **(options or {})}
    if listen:
        opts["llm.listenIpInfo"] = "127.0.0.1:0"
    eng = dxl.Engine(D_ID, dxl.LLMRole.DECODER, opts)
    await eng.start()
    buf = KVBuffers(TENSORS, BLOCKS, BB, fill=False)
    cache = await eng.register_blocks_cache(
        buf.desc(), buf.addrs, dxl.BlocksCacheKey(D_ID, 0), remote_accessible=True
    )
    return eng, cache, buf


async def test_pull_and_push_over_tcp(make_peer):
    peer = prefill(make_peer)
    eng, cache, buf = await decoder(listen=True)
    async with eng:
        assert (await eng.link_clusters([peer.cluster_info()]))[0] == S.LLM_SUCCESS
        assert eng.stats()["links"][P_ID]["transport"] == "tcp"
        src, dst = [5, 9, 10, 11, 63, 0], [0, 1, 2, 3, 40, 41]
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, src, dst)
        assert buf.matches(ALL, dst, 7, ALL, src)
        assert buf.untouched(ALL, [4, 5, 39, 42])
        await eng.pull_blocks(
            dxl.BlocksCacheKey(P_ID, 0),
            cache,
            [1, 2],
            [50, 51],
            src_layer_range=range(1, 2),
            dst_layer_range=range(0, 1),
        )
        assert buf.matches([0, 1], [50, 51], 7, [2, 3], [1, 2])
        assert buf.untouched([2, 3], [50, 51])
        # push from us into the prefill, and from the prefill into us (symmetric link)
        await eng.push_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [0, 1], [20, 21])
        args = dict(
            tensors=ALL, dst_blocks=[20, 21], src_seed=7, src_tensors=ALL, src_blocks=[5, 9]
        )
        assert await peer.acall("matches", name="kv", args=args)
        await peer.acall(
            "push", name="kv", cluster_id=D_ID, model_id=0, src_blocks=[33], dst_blocks=[60]
        )
        assert buf.matches(ALL, [60], 7, ALL, [33])
        assert eng.stats()["data_server"]["requests_served"] >= 1


async def test_auto_prefers_cma_on_one_host(make_peer):
    peer = prefill(make_peer, options={"dxl.Transport": "auto"})
    eng, _, _ = await decoder({"dxl.Transport": "auto"})
    async with eng:
        await eng.link_clusters([peer.cluster_info()])
        # cma, with the prefill's memory mapped (cma+shm) where dxl shared it by default
        (used,) = eng.stats()["transports"].items()
        assert used in (("cma", 1), ("cma+shm", 1))


async def test_secret_authenticates_links(make_peer, caplog):
    peer = prefill(make_peer, options={"dxl.AuthToken": "right"})
    eng, cache, buf = await decoder({"dxl.AuthToken": "wrong"})
    async with eng:
        with caplog.at_level(logging.ERROR, logger="dxl"):
            _, rets = await eng.link_clusters([peer.cluster_info()])
        assert rets == [S.LLM_LINK_FAILED]
        assert "proof" in caplog.text or "secret" in caplog.text
        assert "wrong" not in caplog.text and "right" not in caplog.text  # never the secret
    eng, cache, buf = await decoder()  # no secret at all
    async with eng:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="dxl"):
            _, rets = await eng.link_clusters([peer.cluster_info()])
        assert rets == [S.LLM_LINK_FAILED]
        assert "secret" in caplog.text
    eng, cache, buf = await decoder({"dxl.AuthToken": "right"})
    async with eng:
        assert (await eng.link_clusters([peer.cluster_info()]))[0] == S.LLM_SUCCESS
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [3], [3])
        assert buf.matches(ALL, [3], 7, ALL, [3])


async def test_a_peer_that_does_not_listen_cannot_be_reached_over_tcp(make_peer):
    peer = prefill(make_peer)
    eng, cache, buf = await decoder()  # no listener, hence no data server
    async with eng:
        await eng.link_clusters([peer.cluster_info()])
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [4], [4])  # we reach it
        with pytest.raises(PeerError) as err:
            await peer.acall(
                "push", name="kv", cluster_id=D_ID, model_id=0, src_blocks=[1], dst_blocks=[1]
            )
        assert err.value.status_code == S.LLM_FEATURE_NOT_ENABLED
        assert "does not listen" in str(err.value)
        assert buf.untouched(ALL, [1])


async def test_remote_listen_needs_a_secret():
    with pytest.raises(dxl.LLMException, match="shared secret") as err:
        async with dxl.Engine(1, dxl.LLMRole.PROMPT, {"llm.listenIpInfo": "0.0.0.0:0"}):
            pass
    assert err.value.status_code == S.LLM_PARAM_INVALID
    opts = {"llm.listenIpInfo": "0.0.0.0:0", "dxl.AuthToken": "t"}
    async with dxl.Engine(1, dxl.LLMRole.PROMPT, opts) as eng:
        assert eng.listen_address is not None
    opts = {"llm.listenIpInfo": "0.0.0.0:0", "dxl.AllowRemoteListen": "1"}
    async with dxl.Engine(1, dxl.LLMRole.PROMPT, opts) as eng:
        assert eng.listen_address is not None


async def test_data_port_without_the_secret_is_refused(make_peer):
    peer = prefill(make_peer, options={"dxl.AuthToken": "s"})
    eng, cache, buf = await decoder({"dxl.AuthToken": "s"})
    async with eng:
        await eng.link_clusters([peer.cluster_info()])
        link = eng._links.get(P_ID)
        port = link.peer.data_port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"garbage" * 100)  # no handshake: dropped
            s.settimeout(5)
            try:
                data = s.recv(1024)
            except ConnectionResetError:
                data = b""
            assert len(data) <= HELLO_BYTES  # at most the server's greeting, never memory
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [8], [8])  # still serving
        assert buf.matches(ALL, [8], 7, ALL, [8])


async def test_killed_tcp_peer_fails_in_time_and_others_continue(make_peer):
    p1 = prefill(make_peer, cluster_id=1, seed=1)
    p3 = prefill(make_peer, cluster_id=3, seed=3)
    # the pull's own timeout is beyond pytest's: only the closed connections can fail it
    eng, cache, buf = await decoder({"llm.SyncKvCacheWaitTime": "300000"})
    async with eng:
        assert (await eng.link_clusters([p1.cluster_info(), p3.cluster_info()]))[0] == S.LLM_SUCCESS
        p1.kill(signal.SIGKILL)
        p1.proc.join(5)
        with pytest.raises(dxl.LLMException) as err:
            await eng.pull_blocks(dxl.BlocksCacheKey(1, 0), cache, [1], [1])
        assert err.value.status_code in (S.LLM_LINK_FAILED, S.LLM_NOT_YET_LINK)  # not TIMEOUT
        await eng.pull_blocks(dxl.BlocksCacheKey(3, 0), cache, [2], [2])
        assert buf.matches(ALL, [2], 3, ALL, [2])


async def test_stopped_tcp_peer_times_out_without_breaking_the_link(make_peer):
    peer = prefill(make_peer, options={"dxl.HeartbeatIntervalMs": "2000"})
    eng, cache, buf = await decoder(
        {"llm.SyncKvCacheWaitTime": "300", "dxl.HeartbeatIntervalMs": "2000"}
    )
    async with eng:
        await eng.link_clusters([peer.cluster_info()])
        peer.kill(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(dxl.LLMException) as err:
                await eng.pull_blocks(
                    dxl.BlocksCacheKey(P_ID, 0), cache, list(range(64)), list(range(64))
                )
            # ended by its 300 ms timeout (the stopped peer sends nothing), and not before it
            assert err.value.status_code == S.LLM_TIMEOUT
            assert time.monotonic() - t0 >= 0.3
        finally:
            peer.kill(signal.SIGCONT)
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [6], [6])  # link survived
        assert buf.matches(ALL, [6], 7, ALL, [6])
