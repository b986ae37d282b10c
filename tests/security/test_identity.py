"""Identities that decide where bytes go are proven, never declared.

Each test mounts an attack against a live engine in another process; the attacker speaks the
link protocol over raw sockets (``stranger``) and claims whatever helps it: the victim's own pid
and probe, a live peer's cluster id, a "cache" whose addresses lie in the victim's unregistered
memory. The victim's memory outside its registrations must stay unchanged and never be returned.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import pytest
import stranger
from peer import PeerError

import dxl
from dxl.control import wire
from dxl.control.auth import authenticate_socket, link_key

pytestmark = [pytest.mark.multiproc]

S = dxl.LLMStatusCode
VICTIM, PARTNER, DECODER = 1, 7, 2
TENSORS, BLOCKS, BB = 2, 8, 4096
SECRETS = [None, "the-deployment-secret"]


def victim_with_canary(make_peer, secret, cluster_id=VICTIM, role="PROMPT"):
    options = {"dxl.AuthToken": secret} if secret else {}
    victim = make_peer(cluster_id, role=role, options=options)
    victim.call(
        "register",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BB,
        seed=3,
        model_id=0,
    )
    canary, size = victim.call("canary", name="c")
    return victim, canary, size


def learn_identity(victim, secret):
    """Link once as ourselves: the welcome tells any linker the victim's pid and probe."""
    first = stranger.Link(victim.address, victim.cluster_id, stranger.about(99), secret)
    assert first.up, first.ready
    pid, probe = first.welcome["pid"], tuple(first.welcome["probe"])
    first.close()
    return pid, probe


@pytest.mark.parametrize("secret", SECRETS)
def test_a_stranger_claiming_our_pid_cannot_aim_our_copies_at_us(make_peer, secret):
    victim, canary, size = victim_with_canary(make_peer, secret)
    pid, probe = learn_identity(victim, secret)
    assert pid == victim.pid
    # now claim to be the victim itself, and advertise a "cache" lying on its canary
    evil = stranger.cache_entry(5, [canary], size, 1)
    link = stranger.Link(
        victim.address, VICTIM, stranger.about(PARTNER, pid=pid, probe=probe), secret, caches=[evil]
    )
    assert link.up, link.ready
    stats = victim.call("stats")
    assert stats["links"][PARTNER]["transport"] != "cma"  # an unproven pid gets no cma
    # the application now moves data to the cluster it believes is its partner
    for cmd in ("push", "pull"):
        with pytest.raises(PeerError):
            victim.call(cmd, cluster_id=PARTNER, name="kv", src_blocks=[0], dst_blocks=[0])
    assert victim.call("canary_intact", name="c")
    assert victim.call(
        "untouched", name="kv", tensors=list(range(TENSORS)), blocks=list(range(BLOCKS))
    )  # nothing of the canary was returned
    link.close()


@pytest.mark.parametrize("secret", SECRETS)
def test_a_stranger_cannot_evict_a_live_link(make_peer, secret):
    victim, _, _ = victim_with_canary(make_peer, secret)
    options = {"dxl.AuthToken": secret} if secret else {}
    decoder = make_peer(DECODER, role="DECODER", options=options)
    decoder.call(
        "register",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BB,
        seed=0,
        fill=False,
    )
    assert decoder.call("link", cluster_id=VICTIM, address=victim.address) == S.LLM_SUCCESS
    link = stranger.Link(victim.address, VICTIM, stranger.about(DECODER), secret)
    assert not link.up and link.ready["t"] == "reject"
    assert link.ready["code"] == S.LLM_ALREADY_LINK
    link.close()
    decoder.call("pull", cluster_id=VICTIM, name="kv", src_blocks=[4], dst_blocks=[1])
    args = dict(
        tensors=list(range(TENSORS)),
        dst_blocks=[1],
        src_seed=3,
        src_tensors=list(range(TENSORS)),
        src_blocks=[4],
    )
    assert decoder.call("matches", name="kv", args=args)
    assert victim.call("links") == [DECODER]


@pytest.mark.parametrize("secret", SECRETS)
def test_a_fake_prefill_cannot_aim_a_decoders_copies_at_the_decoder(make_peer, secret):
    """The decode links to a fake prefill, which copies the decode's identity out of its hello
    into its welcome, and advertises a cache lying on the decode's unregistered memory."""
    decoder, canary, size = victim_with_canary(make_peer, secret, DECODER, role="DECODER")
    fake = socket.socket()
    fake.bind(("127.0.0.1", 0))
    fake.listen(1)
    outcome: list[object] = []

    def serve() -> None:
        conn, _ = fake.accept()
        with conn:
            conn.settimeout(10)
            authenticate_socket(conn, secret, role="server", purpose="link", timeout=10)
            hello = stranger.recv(conn)
            mine = bytes(32)
            claims = stranger.about(
                VICTIM,
                pid=hello["pid"],
                probe=tuple(hello["probe"]),
                host=hello["host"],
                challenge=mine,
            )
            stranger.send(conn, "welcome", **claims)
            reply = stranger.recv(conn)  # the decode's ready (or reject)
            outcome.append(reply["t"])
            if reply["t"] == "ready":
                link_key(secret, bytes.fromhex(hello["challenge"]), mine)  # we could use it
                evil = stranger.cache_entry(5, [canary], size, 1)
                stranger.send(conn, "ready", caches=[evil])
                with contextlib.suppress(OSError):  # until the decode closes
                    outcome.append(stranger.recv(conn))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    code = decoder.call("link", cluster_id=VICTIM, address=fake.getsockname())
    if code == S.LLM_SUCCESS:
        stats = decoder.call("stats")
        assert stats["links"][VICTIM]["transport"] != "cma"
        with pytest.raises(PeerError):
            decoder.call("pull", cluster_id=VICTIM, name="kv", src_blocks=[0], dst_blocks=[0])
        decoder.call("unlink", cluster_id=VICTIM, address=fake.getsockname(), force=True)
    assert decoder.call("canary_intact", name="c")
    assert decoder.call(
        "untouched", name="kv", tensors=list(range(TENSORS)), blocks=list(range(BLOCKS))
    )
    server.join(10)
    fake.close()


def test_cma_towards_this_very_process_is_refused():

    from dxl.transport.cma import CmaTransport

    with pytest.raises(ValueError, match="this very process"):
        CmaTransport(os.getpid(), 1)


def test_crafted_hello_frames_cost_one_connection(make_peer):
    """Deep nesting, huge numbers, wrong types: a FrameError for that connection, nothing
    more; the engine keeps linking real peers."""
    victim, _, _ = victim_with_canary(make_peer, None)
    bodies = [
        b"[" * 5000 + b"]" * 5000,
        b'{"t": "hello", "proto": ' + b"9" * 5000 + b"}",
        b'{"t": "hello"}',
        b"\xff\xfe",
        b'{"t": "ready", "caches": [{}]}',
    ]
    for body in bodies:
        sock = stranger.connect(victim.address)
        stranger.send_raw(sock, body[: wire.PRELINK_MAX_FRAME])
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed on us
        sock.close()
    link = stranger.Link(victim.address, VICTIM, stranger.about(99))
    assert link.up
    link.close()
