"""Fault injection on every transport (tests/transports.py; nixl too under ``make test-nixl``):
peers killed before, during and after transfers, stopped past the timeout, unlinked or
unregistered under a transfer, restarted with the same cluster id and port; a busy listener
port; a link to nowhere. Each case asserts which calls fail, with which status, and that other
links, transfers and memory outside the failed transfer are unaffected.

No case measures how long a failure took: where a peer dies, the decoder's own timeout is set
far beyond the test's (LONG_WAIT), so a failure with a "peer gone" status can only have come
from the death itself; where the timeout is what is tested, the status is LLM_TIMEOUT."""

from __future__ import annotations

import asyncio
import signal
import socket

import pytest
from transports import in_flight, link_name, params, transport_options
from waiting import async_wait_until, start_until_in_flight

import dxl
from dxl.testing import KVBuffers

pytestmark = [pytest.mark.multiproc]

S = dxl.LLMStatusCode
GONE = (S.LLM_LINK_FAILED, S.LLM_NOT_YET_LINK)
TIMEOUT_MS = 600
# The decoder's wait when a failure must come from the peer's death and not from the timeout:
# longer than pytest's timeout (pyproject.toml), so a transfer that waited for it fails the test.
LONG_WAIT = {"llm.SyncKvCacheWaitTime": "300000"}
TENSORS, BLOCKS, BB = 16, 64, 64 << 10  # 64 MiB per side: a pull of all of it takes a while
ALL = list(range(TENSORS))


@pytest.fixture(params=params("cma", "tcp", "shared"))
def transport(request: pytest.FixtureRequest) -> str:
    """cma, tcp, cma where the prefill moved its registered memory onto memfds
    (dxl.ShareRegistered), so the decoder copies it through its mapping (cma+shm), or nixl."""
    return request.param


def options(transport: str, **extra: str) -> dict[str, str]:
    return {
        **transport_options(transport),
        "llm.SyncKvCacheWaitTime": str(TIMEOUT_MS),
        "dxl.HeartbeatIntervalMs": "200",
        **extra,
    }


def start_prefill(make_peer, transport: str, cluster_id: int = 1, seed: int = 1, **kw: str):
    peer = make_peer(cluster_id, options=options(transport, **kw))
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


class Decoder:
    """This process's engine with one blocks cache."""

    def __init__(self, transport: str, **extra: str) -> None:
        self.eng = dxl.Engine(2, dxl.LLMRole.DECODER, options(transport, **extra))
        self.transport = transport
        self.buf = KVBuffers(TENSORS, BLOCKS, BB, fill=False)

    async def __aenter__(self) -> Decoder:
        await self.eng.start()
        self.cache = await self.eng.register_blocks_cache(self.buf.desc(), self.buf.addrs)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.eng.close()

    async def link(self, *peers) -> None:
        ret, rets = await self.eng.link_clusters([p.cluster_info() for p in peers])
        assert ret == S.LLM_SUCCESS, rets
        # on "shared", the faults below then hit the memcpy path
        links = self.eng.stats()["links"]
        want = link_name(self.transport)
        assert all(links[p.cluster_id]["transport"] == want for p in peers), links

    def pull(self, cluster_id: int, src: list[int], dst: list[int]):
        return self.eng.pull_blocks(dxl.BlocksCacheKey(cluster_id, 0), self.cache, src, dst)

    def push(self, cluster_id: int, src: list[int], dst: list[int]):
        return self.eng.push_blocks(dxl.BlocksCacheKey(cluster_id, 0), self.cache, src, dst)


async def expect_failure(call, codes=GONE):
    """``call`` fails with one of ``codes``: GONE (the peer's death, never LLM_TIMEOUT), or the
    single status that the case's cause produces."""
    with pytest.raises(dxl.LLMException) as err:
        await call
    assert err.value.status_code in codes, err.value
    return err.value


@pytest.mark.parametrize("op", ["pull", "push"])
async def test_killed_before(make_peer, transport, op):
    p1, p3 = start_prefill(make_peer, transport), start_prefill(make_peer, transport, 3, seed=3)
    async with Decoder(transport, **LONG_WAIT) as d:
        await d.link(p1, p3)
        p1.kill()
        p1.proc.join(5)
        await expect_failure(getattr(d, op)(1, [0], [0]))
        assert d.buf.untouched(ALL, list(range(BLOCKS)))
        await d.pull(3, [4], [4])  # the other link is fine
        assert d.buf.matches(ALL, [4], 3, ALL, [4])


async def test_killed_during_a_pull(make_peer, transport):
    p1, p3 = start_prefill(make_peer, transport), start_prefill(make_peer, transport, 3, seed=3)
    async with Decoder(transport, **LONG_WAIT) as d:
        await d.link(p1, p3)
        half = list(range(BLOCKS // 2))
        pulls = await start_until_in_flight(
            lambda: [asyncio.create_task(d.pull(1, half, half)) for _ in range(4)],
            "a pull from the prefill",
            in_flight=lambda: in_flight(d.eng),
        )
        p1.kill()  # a copy was under way an instant ago
        results = await asyncio.gather(*pulls, return_exceptions=True)
        for r in results:  # finished before the kill, or failed by it (never by the timeout)
            assert r is None or (isinstance(r, dxl.LLMException) and r.status_code in GONE), r
        assert d.buf.untouched(ALL, list(range(BLOCKS // 2, BLOCKS)))  # outside the request
        await expect_failure(d.pull(1, [0], [0]))
        await d.pull(3, [40], [40])
        assert d.buf.matches(ALL, [40], 3, ALL, [40])


async def test_killed_after(make_peer, transport):
    p1 = start_prefill(make_peer, transport)
    async with Decoder(transport, **LONG_WAIT) as d:
        await d.link(p1)
        await d.pull(1, [1, 2], [1, 2])
        p1.kill()
        p1.proc.join(5)
        await expect_failure(d.pull(1, [3], [3]))
        assert d.buf.matches(ALL, [1, 2], 1, ALL, [1, 2])  # what arrived stays intact
        assert d.buf.untouched(ALL, [3])


async def test_transfer_cache_async_to_a_killed_peer(make_peer, transport):
    p1 = start_prefill(make_peer, transport, **{"llm.listenIpInfo": "127.0.0.1:0"})  # type: ignore[arg-type]
    async with Decoder(transport, **LONG_WAIT) as d:
        await d.link(p1)
        p1.kill()
        p1.proc.join(5)

        class Ready(dxl.LayerSynchronizer):
            def synchronize_layer(self, layer_index: int, timeout_in_millis: int | None) -> bool:
                return True

        cfg = dxl.TransferWithCacheKeyConfig(dxl.BlocksCacheKey(1, 0), range(0, 2), range(0, 2))
        try:
            task = await d.eng.transfer_cache_async(d.cache, Ready(), [cfg], [0], [0])
        except dxl.LLMException as exc:  # the link may already be gone when the task starts
            assert exc.status_code in GONE
        else:
            results = await task.wait_async()
            assert results[0] in GONE  # by the death: the wait for it is LONG_WAIT


async def test_stopped_past_the_timeout_then_resumed(make_peer, transport, monkeypatch):
    if transport == "nixl":  # UCX without cma (both processes): its RMA needs the target,
        # as tcp does. The read released at its deadline is held until NIXL ends it: the
        # stopped peer's late reply once crashed the process (ucp_get_rep_handler) when it
        # landed after the handle was released and the link dropped
        monkeypatch.setenv("UCX_TLS", "^cma")
    p1 = start_prefill(make_peer, transport)
    async with Decoder(transport) as d:
        await d.link(p1)
        p1.kill(signal.SIGSTOP)
        try:
            if transport in ("tcp", "nixl"):  # nobody answers the data request: a timeout
                await expect_failure(  # the timeout ended it: nothing else could
                    d.pull(1, list(range(BLOCKS)), list(range(BLOCKS))), codes=(S.LLM_TIMEOUT,)
                )
            else:  # a stopped process's memory stays readable: cma still delivers
                await d.pull(1, [5], [5])
                assert d.buf.matches(ALL, [5], 1, ALL, [5])
            await async_wait_until(  # three heartbeats missed: the link is dropped
                lambda links: 1 not in links,
                10,
                "the heartbeat to drop the link to the stopped peer",
                observe=lambda: d.eng.stats()["links"],
            )
            await expect_failure(d.pull(1, [6], [6]), codes=(S.LLM_NOT_YET_LINK,))
        finally:
            p1.kill(signal.SIGCONT)
        await async_wait_until(  # resumed, it answers and has dropped its end of the old link
            lambda links: links == [],
            10,
            "the resumed peer to drop its end of the link",
            observe=lambda: p1.acall("links"),
        )
        await d.link(p1)  # resumed: it can be linked again
        await d.pull(1, [7], [7])
        assert d.buf.matches(ALL, [7], 1, ALL, [7])


async def test_unlink_while_transfers_are_in_flight(make_peer, transport):
    p1 = start_prefill(make_peer, transport)
    async with Decoder(transport) as d:
        await d.link(p1)
        half = list(range(BLOCKS // 2))
        pulls = await start_until_in_flight(
            lambda: [asyncio.create_task(d.pull(1, half, half)) for _ in range(3)],
            "a pull from the prefill",
            in_flight=lambda: in_flight(d.eng),
        )
        _, rets = await d.eng.unlink_clusters([p1.cluster_info()])
        assert rets == [S.LLM_SUCCESS]
        for r in await asyncio.gather(*pulls, return_exceptions=True):
            assert r is None or isinstance(r, dxl.LLMException), r
        await expect_failure(d.pull(1, [0], [0]), codes=(S.LLM_NOT_YET_LINK,))
        assert d.buf.untouched(ALL, list(range(BLOCKS // 2, BLOCKS)))


async def test_unregister_while_a_peer_reads(make_peer, transport):
    p1 = start_prefill(make_peer, transport)
    async with Decoder(transport) as d:
        await d.link(p1)
        everything = list(range(BLOCKS))
        [reading] = await start_until_in_flight(
            lambda: [asyncio.create_task(d.pull(1, everything, everything))],
            "a pull of the whole cache",
            in_flight=lambda: in_flight(d.eng),
        )
        await p1.acall("unregister", name="kv")  # returns once our read has stopped
        result = (await asyncio.gather(reading, return_exceptions=True))[0]
        assert result is None or isinstance(result, dxl.LLMException), result
        if result is None:
            assert d.buf.matches(ALL, everything, 1, ALL, everything)
        await expect_failure(d.pull(1, [0], [0]), codes=(S.LLM_KV_CACHE_NOT_EXIST,))


async def test_restarted_peer_with_same_id_and_port(make_peer, transport):
    p1 = start_prefill(make_peer, transport, seed=1)
    port = p1.address[1]
    async with Decoder(transport, **LONG_WAIT) as d:
        await d.link(p1)
        old = d.eng.stats()["links"][1]["peer_incarnation"]
        p1.kill()
        p1.proc.join(5)
        p1b = make_peer(1, options=options(transport, **{"llm.listenIpInfo": f"127.0.0.1:{port}"}))
        await expect_failure(d.pull(1, [0], [0]))  # the old incarnation is never used
        p1b.call(
            "register",
            name="kv",
            num_tensors=TENSORS,
            num_blocks=BLOCKS,
            block_bytes=BB,
            seed=9,
            model_id=0,
        )
        await d.link(p1b)
        assert d.eng.stats()["links"][1]["peer_incarnation"] != old
        await d.pull(1, [2], [2])
        assert d.buf.matches(ALL, [2], 9, ALL, [2])  # the new process's bytes


async def test_listener_port_already_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(dxl.LLMException, match=f"cannot listen on 127.0.0.1:{port}") as err:
            async with dxl.Engine(1, dxl.LLMRole.PROMPT, {"llm.listenIpInfo": f"127.0.0.1:{port}"}):
                pass
        assert err.value.status_code == S.LLM_FAILED
        assert "init" in str(err.value)


async def test_switch_role_to_a_port_in_use_names_switch_role():
    async with dxl.Engine(1, dxl.LLMRole.DECODER, {}) as eng:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            with pytest.raises(dxl.LLMException, match="switch_role") as err:
                await eng.switch_role(dxl.LLMRole.PROMPT, {"llm.listenIpInfo": f"127.0.0.1:{port}"})
        assert err.value.status_code == S.LLM_FAILED
        assert f"cannot listen on 127.0.0.1:{port}" in str(err.value)
        assert eng.role == dxl.LLMRole.DECODER  # nothing changed


async def test_link_to_where_nothing_listens(transport):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = dxl.LLMClusterInfo()
    info.remote_cluster_id = 1
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info("127.0.0.1", port)
    async with dxl.Engine(2, dxl.LLMRole.DECODER, options(transport)) as eng:
        # refused at once: a link that waited for its timeout (far beyond pytest's) would fail
        _, rets = await eng.link_clusters([info], timeout=300_000)
        assert rets == [S.LLM_LINK_FAILED]
