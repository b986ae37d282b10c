"""The handoff through the sync facade (``LLMDataDist.handoff``): a decode written against the
blocking API fetches a prefill process's offer, offers its own blocks, aborts, and sees every
end through poll_finished / wait_finished, as the async Engine does."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from handoff_kit import DECODE_SEED, P_ID, PREFILL_SEED, SMALL
from transports import params, transport_options
from waiting import wait_until

import dxl
from dxl.handoff import Ended, FetchError
from dxl.testing import KVBuffers

pytestmark = [pytest.mark.multiproc]

D_ID = 7
ALL = range(SMALL["num_tensors"])


@pytest.fixture
def transport() -> str:
    """The default transport (a test parametrised over ``transport`` overrides it)."""
    return "cma"


@pytest.fixture
def sync_decode(transport: str) -> Iterator[tuple[dxl.LLMDataDist, KVBuffers, dxl.Cache]]:
    dd = dxl.LLMDataDist(dxl.LLMRole.DECODER, D_ID)
    config = dxl.LLMConfig()
    config.listen_ip_info = "127.0.0.1:0"
    dd.init({**config.generate_options(), **transport_options(transport)})
    buf = KVBuffers(
        SMALL["num_tensors"], SMALL["num_blocks"], SMALL["block_bytes"], seed=DECODE_SEED
    )
    try:
        cache = dd.cache_manager.register_blocks_cache(
            buf.desc(), buf.addrs, remote_accessible=True
        )
        yield dd, buf, cache
    finally:
        dd.finalize()


@pytest.mark.parametrize("transport", params("cma"))
def test_sync_fetch_offer_abort_and_ends(make_peer, sync_decode, transport) -> None:
    dd, buf, cache = sync_decode
    prefill = make_peer(P_ID, options=transport_options(transport))
    prefill.call("register", name="kv", seed=PREFILL_SEED, model_id=0, **SMALL)

    # fetch a prefill's offer, layer by layer, blocking
    ticket = prefill.call("offer", name="kv", request_id="r1", blocks=[1, 2])
    layers: list[tuple[int, int]] = []
    dd.handoff.fetch(ticket, cache, [5, 6], on_layer=lambda lo, hi: layers.append((lo, hi)))
    assert buf.matches(ALL, [5, 6], PREFILL_SEED, ALL, [1, 2])
    assert layers and layers[-1][1] == SMALL["num_tensors"] // 2
    [end] = prefill.call("finished")
    assert (end["request_id"], end["reason"]) == ("r1", "done")

    # a fetch of a ticket the prefill never issued fails with the request id and the blocks
    forged = json.loads(ticket)
    forged["token"] = "0" * len(forged["token"])
    with pytest.raises(FetchError) as err:
        dd.handoff.fetch(json.dumps(forged), cache, [3])
    assert err.value.request_id == "r1" and err.value.partial_blocks in ([], [3])

    # our own offer, fetched by the prefill; its end arrives through wait_finished
    mine = dd.handoff.offer("r2", cache, [5, 6])
    assert dd.handoff.live() == 1
    prefill.call("fetch", ticket=mine.to_json(), name="kv", blocks=[9, 10])
    assert prefill.call(
        "matches",
        name="kv",
        args=dict(
            tensors=list(ALL),
            dst_blocks=[9, 10],
            src_seed=PREFILL_SEED,
            src_tensors=list(ALL),
            src_blocks=[1, 2],
        ),
    )
    ends = dd.handoff.wait_finished(20)
    assert [(e.request_id, e.reason) for e in ends] == [("r2", Ended.DONE)]

    # an abort: nothing waits, the end is reported once
    third = dd.handoff.offer("r3", cache, [7])
    dd.handoff.abort(third)
    assert [(e.request_id, e.reason) for e in dd.handoff.poll_finished()] == [("r3", Ended.ABORTED)]
    assert dd.handoff.wait_finished(0) == [] and dd.handoff.live() == 0
    for bad in (-1, float("nan"), "1"):
        with pytest.raises(dxl.LLMException, match="timeout_s"):
            dd.handoff.wait_finished(bad)

    dd.handoff.max_fetches = 3
    assert dd.handoff.max_fetches == 3
    stats = dd.handoff.stats()
    assert stats["offers"] == 2, stats
    assert stats["ended"] == {"done": 1, "failed": 0, "aborted": 1, "expired": 0}, stats
    wait_until(lambda: prefill.call("live") == 0, 10, "the prefill's offers ended")


def test_sync_handoff_before_init_raises(sync_decode) -> None:
    dd = dxl.LLMDataDist(dxl.LLMRole.DECODER, D_ID + 1)
    with pytest.raises(RuntimeError, match="not initialized"):
        dd.handoff  # noqa: B018
