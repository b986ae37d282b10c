"""Prefill and decode on two "hosts" (network namespaces joined by a veth pair) over tcp:
byte-exact pull and push across the veth, and the network failing under a transfer."""

from __future__ import annotations

import signal
import threading

import pytest
from peer import PeerError
from waiting import wait_until

import dxl
from dxl.bench.netns import TwoHosts, netns_available

why_not = netns_available()
pytestmark = [
    pytest.mark.root,
    pytest.mark.multiproc,
    pytest.mark.netns,
    pytest.mark.skipif(why_not is not None, reason=why_not or ""),
]

S = dxl.LLMStatusCode
P_ID, D_ID = 1, 2
SECRET = {"dxl.AuthToken": "netns-test-secret", "dxl.Transport": "tcp"}


def pair(make_peer, hosts: TwoHosts, tensors: int, blocks: int, bb: int, **opts: str):
    """A prefill in namespace a and a decode in namespace b, linked over the veth."""
    common = {**SECRET, "dxl.HeartbeatIntervalMs": "300", **opts}
    prefill = make_peer(
        P_ID, options={**common, "llm.listenIpInfo": f"{hosts.ip_a}:0"}, netns=hosts.ns_a
    )
    decode = make_peer(
        D_ID,
        role="DECODER",
        options={**common, "llm.listenIpInfo": f"{hosts.ip_b}:0"},
        netns=hosts.ns_b,
    )
    prefill.call(
        "register",
        name="kv",
        num_tensors=tensors,
        num_blocks=blocks,
        block_bytes=bb,
        seed=5,
        model_id=0,
    )
    decode.call(
        "register",
        name="kv",
        num_tensors=tensors,
        num_blocks=blocks,
        block_bytes=bb,
        seed=6,
        model_id=0,
    )
    assert decode.call("link", cluster_id=P_ID, address=list(prefill.address)) == 0
    return prefill, decode


@pytest.fixture
def hosts():
    with TwoHosts() as h:
        yield h


def test_pull_and_push_across_the_veth(make_peer, hosts):
    prefill, decode = pair(make_peer, hosts, tensors=8, blocks=64, bb=16384)
    assert prefill.address[0] == hosts.ip_a
    everything = list(range(8))
    src, dst = [3, 17, 18, 19, 60], [0, 1, 2, 40, 63]
    decode.call("pull", name="kv", cluster_id=P_ID, src_blocks=src, dst_blocks=dst)
    args = dict(
        tensors=everything, dst_blocks=dst, src_seed=5, src_tensors=everything, src_blocks=src
    )
    assert decode.call("matches", name="kv", args=args)
    assert decode.call("untouched", name="kv", tensors=everything, blocks=[3, 4, 39, 62])
    decode.call(
        "pull",
        name="kv",
        cluster_id=P_ID,
        src_blocks=[7],
        dst_blocks=[10],
        kwargs=dict(src_layer_range=range(0, 1), dst_layer_range=range(3, 4)),
    )
    args = dict(tensors=[6, 7], dst_blocks=[10], src_seed=5, src_tensors=[0, 1], src_blocks=[7])
    assert decode.call("matches", name="kv", args=args)
    decode.call("push", name="kv", cluster_id=P_ID, src_blocks=[11, 12], dst_blocks=[30, 31])
    args = dict(
        tensors=everything,
        dst_blocks=[30, 31],
        src_seed=6,
        src_tensors=everything,
        src_blocks=[11, 12],
    )
    assert prefill.call("matches", name="kv", args=args)
    assert prefill.call("untouched", name="kv", tensors=everything, blocks=[29, 32])


def _pull_in_thread(decode, blocks: int):
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            decode.call(
                "pull",
                deadline_s=60,
                name="kv",
                cluster_id=P_ID,
                src_blocks=list(range(blocks)),
                dst_blocks=list(range(blocks)),
            )
            outcome["result"] = "ok"
        except PeerError as exc:
            outcome["result"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_veth_down_mid_transfer_fails_within_the_timeout(make_peer, hosts):
    prefill, decode = pair(
        make_peer, hosts, tensors=64, blocks=64, bb=64 << 10, **{"llm.SyncKvCacheWaitTime": "1000"}
    )
    for _ in range(5):  # until the cable is pulled while the pull's bytes are crossing it
        before = hosts.received_b(decode.pid)
        thread, outcome = _pull_in_thread(decode, 64)  # 256 MiB

        def crossing(before: int = before, thread: threading.Thread = thread) -> str | None:
            if hosts.received_b(decode.pid) - before >= 1 << 20:
                return "crossing"
            return None if thread.is_alive() else "finished"

        seen = wait_until(
            crossing,
            20,
            "the pull's bytes to cross the veth",
            first_s=0.0002,
            max_s=0.001,
        )
        if seen == "crossing":
            break
        thread.join(20)
        assert outcome["result"] == "ok", outcome
    else:
        pytest.fail("every pull finished before its bytes were seen crossing the veth")
    hosts.down()
    thread.join(60)
    result = outcome["result"]
    if result == "ok":  # its last bytes were across before the cable went; the next one cannot
        thread, outcome = _pull_in_thread(decode, 64)
        thread.join(60)
        result = outcome["result"]
    # Nothing crosses a veth that is down, not even a reset: the pull ended by dxl's own timeout
    # or heartbeat (a status, within the call's deadline), not by TCP's retransmissions (minutes).
    assert isinstance(result, PeerError), result
    assert result.status_code in (S.LLM_TIMEOUT, S.LLM_LINK_FAILED, S.LLM_NOT_YET_LINK)
    assert decode.proc.is_alive() and prefill.proc.is_alive()


def test_stopped_and_killed_prefill_across_the_veth(make_peer, hosts):
    prefill, decode = pair(
        make_peer, hosts, tensors=8, blocks=64, bb=16384, **{"llm.SyncKvCacheWaitTime": "500"}
    )
    prefill.kill(signal.SIGSTOP)
    try:
        with pytest.raises(PeerError) as err:  # the stopped prefill answers nothing: a timeout
            decode.call(
                "pull",
                name="kv",
                cluster_id=P_ID,
                src_blocks=list(range(64)),
                dst_blocks=list(range(64)),
            )
        assert err.value.status_code in (S.LLM_TIMEOUT, S.LLM_NOT_YET_LINK)
    finally:
        prefill.kill(signal.SIGCONT)
    prefill.kill(signal.SIGKILL)
    prefill.proc.join(5)
    with pytest.raises(PeerError) as err:
        decode.call("pull", name="kv", cluster_id=P_ID, src_blocks=[1], dst_blocks=[1])
    # failed by the death (the kernel closed its connections), never by the timeout
    assert err.value.status_code in (S.LLM_LINK_FAILED, S.LLM_NOT_YET_LINK)
    assert decode.proc.is_alive()
