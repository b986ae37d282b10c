"""Everything a stranger can grow is bounded, and real links keep working while it tries.

Floods run against an engine in another process (or in this one, where the log is what is
measured); real links and transfers run beside them. No duration is asserted: transfers must
complete (bytes checked) while a flood goes on for as long as they run, and a link attempt must
end with the status of its own timeout while every other timeout is set beyond pytest's.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time

import pytest
import stranger

import dxl
from dxl.control.auth import authenticate_socket

pytestmark = [pytest.mark.multiproc]

S = dxl.LLMStatusCode
VICTIM, DECODER = 1, 2
TENSORS, BLOCKS, BB = 2, 64, 8192
ALL = list(range(TENSORS))


def prefill(make_peer, options=None):
    peer = make_peer(VICTIM, options=options)
    peer.call(
        "register",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BB,
        seed=4,
        model_id=0,
    )
    return peer


def decoder_linked(make_peer, victim, options=None):
    dec = make_peer(DECODER, role="DECODER", options=options)
    dec.call(
        "register",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BB,
        seed=0,
        fill=False,
    )
    assert dec.call("link", cluster_id=VICTIM, address=victim.address) == S.LLM_SUCCESS
    return dec


def pull_checked(dec, block: int) -> float:
    """One pull of one block; returns its duration, checks its bytes."""
    t0 = time.monotonic()
    dec.call("pull", cluster_id=VICTIM, name="kv", src_blocks=[block], dst_blocks=[block])
    took = time.monotonic() - t0
    args = dict(tensors=ALL, dst_blocks=[block], src_seed=4, src_tensors=ALL, src_blocks=[block])
    assert dec.call("matches", name="kv", args=args)
    return took


@contextlib.contextmanager
def silent_connections(address, count):
    """``count`` connections that connect and then say nothing at all."""
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(address, timeout=5))
        yield socks
    finally:
        for s in socks:
            s.close()


def test_silent_connections_do_not_lock_real_links_out(make_peer):
    victim = prefill(make_peer)
    with silent_connections(victim.address, 200):
        dec = decoder_linked(make_peer, victim)  # the oldest silent handshakes are shed
        assert pull_checked(dec, 3) < 1.0
    assert victim.call("links") == [DECODER]


def test_silent_connections_to_the_data_port_do_not_lock_real_links_out(make_peer):
    """The tcp data server's handshakes are capped like the control port's: 200 silent
    connections shed the oldest, so a decode linking during the flood still gets its data
    connections through."""
    options = {"dxl.Transport": "tcp"}
    victim = prefill(make_peer, options)
    probe = stranger.Link(victim.address, VICTIM, stranger.about(99))  # its welcome names the port
    data_port = probe.welcome.get("data_port")
    probe.close()
    assert data_port, probe.welcome
    with silent_connections((victim.address[0], data_port), 200):
        dec = decoder_linked(make_peer, victim, options)
        assert pull_checked(dec, 3) < 1.0
    assert victim.call("links") == [DECODER]


@pytest.mark.parametrize("transport", ["cma", "tcp"])
def test_slow_link_setups_do_not_starve_transfers(make_peer, transport):
    """40 strangers keep linking, naming a data port that accepts and never answers: their
    setups wait (to their deadline) and start again, for as long as a linked decode pulls; its
    pulls complete, bytes checked, while the flood lasts (starved, they would wait for the
    flood's end, which comes only after them: pytest's timeout)."""
    options = {"dxl.Transport": transport}
    victim = prefill(make_peer, options)
    dec = decoder_linked(make_peer, victim, options)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(128)  # accepts (the kernel does), never reads or writes
    outcomes: list[object] = []
    flooding = [threading.Event() for _ in range(40)]
    stop = threading.Event()

    def stranger_link(i: int) -> None:
        claims = stranger.about(100 + i, data_port=silent.getsockname()[1])
        while not stop.is_set():
            flooding[i].set()
            try:
                link = stranger.Link(victim.address, VICTIM, claims, timeout=15)
                outcomes.append(link.ready.get("t"))
                link.close()
            except OSError as exc:
                outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=stranger_link, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    try:
        assert all(f.wait(30) for f in flooding), "a stranger never started"
        for b in range(20):
            pull_checked(dec, b)  # completes, bytes checked, while the strangers go on
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        silent.close()
    assert not any(t.is_alive() for t in threads)
    assert len(outcomes) >= 40 and "ready" not in outcomes  # none of them got a link
    assert victim.call("links") == [DECODER]


def test_link_clusters_returns_by_its_timeout(make_peer):
    """A peer that answers the handshake but whose data port never answers: link_clusters
    (timeout=1000) ends by its timeout, not by sync_kv_timeout (300 s here, beyond pytest's and
    the call's deadlines: ended by it, the test fails)."""
    dec = make_peer(
        DECODER,
        role="DECODER",
        options={"llm.SyncKvCacheWaitTime": "300000", "dxl.Transport": "tcp"},
    )
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    fake = socket.socket()
    fake.bind(("127.0.0.1", 0))
    fake.listen(1)

    def serve() -> None:
        conn, _ = fake.accept()
        with conn:
            conn.settimeout(10)
            authenticate_socket(conn, None, role="server", purpose="link", timeout=10)
            stranger.recv(conn)  # hello
            stranger.send(
                conn, "welcome", **stranger.about(VICTIM, data_port=silent.getsockname()[1])
            )
            with contextlib.suppress(OSError):
                stranger.recv(conn)  # whatever the decode says before it gives up

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    code = dec.call("link", cluster_id=VICTIM, address=fake.getsockname(), timeout=1000)
    assert code == S.LLM_LINK_FAILED
    server.join(10)
    fake.close()
    silent.close()


def test_frames_announced_huge_before_a_link_cost_no_memory(make_peer):
    """200 connections that authenticate (no secret: the exchange of hellos) and announce a
    4 MiB frame: refused at the header, so memory stays flat and links keep working."""
    victim = prefill(make_peer)
    before = victim.call("rss_kib")
    socks = []
    try:
        for _ in range(200):
            sock = stranger.connect(victim.address)
            sock.sendall(struct.pack(">I", 4 << 20) + b"{" * 1000)
            socks.append(sock)
        dec = decoder_linked(make_peer, victim)
        pull_checked(dec, 5)  # bytes checked, with the 200 connections still open
        grown_mib = (victim.call("rss_kib") - before) / 1024
        assert grown_mib < 200, f"RSS grew by {grown_mib:.0f} MiB"
    finally:
        for s in socks:
            s.close()


async def test_warnings_a_stranger_triggers_are_rate_limited(caplog):
    caplog.set_level(logging.WARNING, logger="dxl")
    async with dxl.Engine(VICTIM, dxl.LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:0"}) as eng:
        address = eng.listen_address
        for _ in range(300):
            reader, writer = await asyncio_open(address)
            writer.write(b"garbage" * 20)  # not the auth handshake
            await writer.drain()
            await reader.read()  # the engine closes it
            writer.close()
    lines = [r for r in caplog.records if r.name == "dxl" and r.levelno >= logging.WARNING]
    assert len(lines) < 30, f"{len(lines)} warnings for 300 refused connections"


async def asyncio_open(address):
    import asyncio

    return await asyncio.open_connection(*address)
