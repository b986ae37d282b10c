"""The dxl vLLM connector's logic without vLLM: scheduler bookkeeping on fake requests, and two
real worker sides (each a dxl engine on its own loop thread) moving numpy-backed KV caches in
vLLM's layout, driven step by step as vLLM drives them."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from vllm_fakes import FakeKV, Req, Status
from waiting import wait_until

from dxl.handoff import Ticket
from dxl.integrations.vllm import stats
from dxl.integrations.vllm.config import DxlConnectorConfig
from dxl.integrations.vllm.scheduler import PARAMS_KEY, SchedulerSide, StepPlan, ticket_for
from dxl.integrations.vllm.worker import TransferResults, WorkerSide

BS = 4  # tokens per block
DONE = Status("FINISHED_LENGTH_CAPPED")


def _cfg(**kw: Any) -> DxlConnectorConfig:
    return DxlConnectorConfig(**kw)


def _prefill_req(rid: str, prompt: int) -> Req:
    return Req(rid, prompt, {"do_remote_decode": True, "do_remote_prefill": False})


class Prefill:
    """A prefill scheduler side and its block table (request -> blocks)."""

    def __init__(self, cfg: DxlConnectorConfig, handshake: dict[int, Any] | None = None) -> None:
        self.sched = SchedulerSide(cfg, BS)
        self.tables: dict[str, list[int]] = {}
        if handshake:
            self.sched.set_handshake(handshake)

    def schedule(
        self, req: Req, blocks: list[int], n: int, preempted: tuple[str, ...] = ()
    ) -> StepPlan:
        """One step that schedules ``n`` tokens of ``req`` (allocating ``blocks``)."""
        if req.request_id not in self.tables:
            self.sched.after_alloc(req, list, 0)
        self.tables[req.request_id] = blocks
        plan = self.sched.build_plan({req.request_id: n}, preempted, self.tables.__getitem__)
        req.num_computed_tokens += n
        return plan

    def finish(self, req: Req, status: Status = DONE) -> tuple[bool, dict[str, Any] | None]:
        req.status = status
        n_blocks = -(-req.num_computed_tokens // BS)
        return self.sched.request_finished(req, self.tables[req.request_id][:n_blocks])


# ====================================================================== scheduler side alone
HS = {0: {"cluster_id": 7, "incarnation": "i7", "endpoint": "127.0.0.1:9", "cache_id": 1,
          "block_bytes": 128, "num_tensors": 3, "tensors_per_layer": 1}}  # fmt: skip


def test_prefill_offers_in_the_step_that_ends_the_prompt_and_hands_it_over() -> None:
    p = Prefill(_cfg(), HS)
    req = _prefill_req("r1", 10)  # 3 blocks
    assert p.schedule(req, [4, 5], 8).offers == []  # a first chunk: more prompt to come
    plan = p.schedule(req, [4, 5, 6], 2)
    [offer] = plan.offers
    assert (offer.request_id, offer.block_ids, offer.num_tokens) == ("r1", (4, 5, 6), 10)
    delay, params = p.finish(req)
    assert delay is True and params is not None
    assert params["do_remote_prefill"] is True and params["remote_num_tokens"] == 10
    [ticket] = [Ticket.of(t) for t in params[PARAMS_KEY]]
    assert (ticket.offer_id, ticket.token, ticket.block_ids) == (
        offer.offer_id,
        offer.token,
        [4, 5, 6],
    )
    assert (ticket.cluster_id, ticket.endpoint, ticket.lease_ms) == (7, "127.0.0.1:9", 30000)
    assert p.sched.build_plan({}, (), p.tables.__getitem__).handed == [offer.offer_id]
    assert p.sched.pending() == {"producing": 0, "offered": 0, "loading": 0, "claims": 0}


def test_prefill_aborted_or_preempted_drops_its_offer() -> None:
    p = Prefill(_cfg(), HS)
    req = _prefill_req("r1", 8)
    [first] = p.schedule(req, [1, 2], 8).offers
    req.num_computed_tokens = 0  # preempted: its blocks are gone
    plan = p.schedule(req, [3, 4], 8, preempted=("r1",))
    assert plan.dropped == [first.offer_id]
    [second] = plan.offers  # offered again under a new identity, after the old one's abort
    assert second.offer_id != first.offer_id and second.block_ids == (3, 4)
    assert p.finish(req, Status("FINISHED_ABORTED")) == (False, None)
    assert p.sched.build_plan({}, (), p.tables.__getitem__).dropped == [second.offer_id]


def test_requests_without_dxl_params_are_left_alone() -> None:
    p = Prefill(_cfg(), HS)
    req = Req("plain", 8, {"some_proxy_key": 1})
    assert p.sched.num_new_matched_tokens(req, 0) == (0, False)
    p.schedule(req, [1, 2], 8)
    assert p.finish(req) == (False, None)
    assert p.sched.build_plan({}, (), p.tables.__getitem__).empty()


def _decode_req(params: dict[str, Any], prompt: int = 10) -> Req:
    return Req("d1", prompt, {**params, "proxy_added_key": "kept"})


def _offered_params(prompt: int = 10, blocks: tuple[int, ...] = (4, 5, 6)) -> dict[str, Any]:
    p = Prefill(_cfg(), HS)
    req = _prefill_req("r1", prompt)
    p.schedule(req, list(blocks), prompt)
    _, params = p.finish(req)
    assert params is not None
    return params


def test_decode_loads_past_its_local_hit_into_new_blocks() -> None:
    d = SchedulerSide(_cfg(), BS)
    req = _decode_req(_offered_params())
    assert d.num_new_matched_tokens(req, 0) == (10, True)
    assert d.num_new_matched_tokens(req, 4) == (6, True)  # no side effects: ask again
    req.num_computed_tokens = 4  # one block from the local prefix cache
    d.after_alloc(req, lambda: [20, 21], 6)
    [load] = d.build_plan({}, (), lambda r: []).loads
    assert load.block_ids == (20, 21)  # the offer's last two blocks
    assert req.kv_transfer_params is not None
    assert req.kv_transfer_params["do_remote_prefill"] is False  # once
    assert d.pending()["loading"] == 1
    d.finished_recving({"d1"})
    assert d.request_finished(req, [9, 20, 21]) == (False, None)
    assert d.build_plan({}, (), lambda r: []).empty()


def test_decode_full_local_hit_releases_the_offer() -> None:
    d = SchedulerSide(_cfg(), BS)
    params = _offered_params()
    req = _decode_req(params)
    assert d.num_new_matched_tokens(req, 10) == (0, False)
    d.after_alloc(req, list, 0)
    plan = d.build_plan({}, (), lambda r: [])
    assert plan.loads == [] and len(plan.releases) == 1
    assert plan.releases[0][0]["token"] == params[PARAMS_KEY][0]["token"]


def test_decode_aborted_before_scheduling_releases_and_mid_load_cancels() -> None:
    d = SchedulerSide(_cfg(), BS)
    early = _decode_req(_offered_params())
    assert d.request_finished(early, []) == (False, None)
    assert len(d.build_plan({}, (), lambda r: []).releases) == 1
    loading = _decode_req(_offered_params())
    d.after_alloc(loading, lambda: [1, 2, 3], 10)
    d.build_plan({}, (), lambda r: [])
    assert d.request_finished(loading, [1, 2, 3]) == (False, None)
    assert d.build_plan({}, (), lambda r: []).cancels == ["d1"]


# ====================================================================== workers, for real
@pytest.fixture
def workers() -> Iterator[dict[str, Any]]:
    made: list[WorkerSide] = []

    def make(kv: FakeKV, **cfg: Any) -> WorkerSide:
        w = WorkerSide(_cfg(**cfg))
        w.register(kv.tensors, kv.blocks)
        made.append(w)
        return w

    yield {"make": make}
    for w in made:
        w.shutdown()


def _results(worker: WorkerSide, what: str, deadline_s: float = 30) -> TransferResults:
    """Collect results until ``what`` (a field) is non-empty."""
    seen = TransferResults()

    def poll() -> bool:
        r = worker.results()
        for f in ("finished_sending", "finished_recving", "failed_recving", "failed_block_ids"):
            getattr(seen, f).update(getattr(r, f))
        return bool(getattr(seen, what))

    wait_until(poll, deadline_s, what)
    return seen


def _handoff(pkv: FakeKV, pw: WorkerSide, prompt: int, blocks: list[int], **cfg: Any):
    """Prefill side of one request: schedule, offer after the forward, finish."""
    p = Prefill(_cfg(**cfg), {0: pw.handshake})
    req = _prefill_req("r1", prompt)
    plan = p.schedule(req, blocks, prompt)
    pw.start(plan)
    pw.after_forward(plan)
    delay, params = p.finish(req)
    assert delay is True and params is not None
    return p, params


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
def test_a_request_moves_from_prefill_to_decode(workers, layout: str) -> None:
    pkv, dkv = FakeKV(layout=layout, seed=3), FakeKV(layout=layout)
    pw, dw = workers["make"](pkv), workers["make"](dkv)
    p, params = _handoff(pkv, pw, 10, [4, 5, 6])
    d = SchedulerSide(_cfg(), BS)
    req = _decode_req(params)
    count, load_async = d.num_new_matched_tokens(req, 0)
    assert (count, load_async) == (10, True)
    d.after_alloc(req, lambda: [10, 11, 12], count)
    dw.start(d.build_plan({}, (), lambda r: []))
    got = _results(dw, "finished_recving")
    assert got.finished_recving == {"d1"} and not got.failed_recving
    for layer in range(pkv.layers):
        for src, dst in zip([4, 5, 6], [10, 11, 12], strict=True):
            np.testing.assert_array_equal(dkv.block(layer, dst), pkv.block(layer, src))
    assert not dkv.block(0, 9).any()  # nothing else written
    pw.start(p.sched.build_plan({}, (), p.tables.__getitem__))  # the hand-over reaches it
    assert _results(pw, "finished_sending").finished_sending == {"r1"}
    assert pw.results() == TransferResults() and dw.results() == TransferResults()  # once
    # what vLLM's get_kv_connector_stats takes: the decode's load with its bytes, the offer's end
    loaded = dw.transfer_stats.take()
    assert loaded is not None and len(loaded[stats.LOAD_SECONDS]) == 1
    assert dw.layout is not None
    assert loaded[stats.LOAD_BYTES] == [3 * dw.layout.block_bytes * len(dw.layout.addrs)]
    assert loaded[stats.LOADS_FAILED] == 0 and dw.transfer_stats.take() is None
    offered = pw.transfer_stats.take()
    assert offered is not None and offered["offers_done"] == 1
    assert not offered[stats.LOAD_SECONDS]


def test_the_schedulers_ticket_is_the_workers(workers) -> None:
    pkv = FakeKV(seed=1)
    pw = workers["make"](pkv)
    p = Prefill(_cfg(), {0: pw.handshake})
    req = _prefill_req("r1", 8)
    [plan] = p.schedule(req, [1, 2], 8).offers
    made = pw._thread.call(
        pw.engine.handoff.offer(
            "r1",
            pw._cache,
            [1, 2],
            tensors_per_layer=1,
            lease_s=30.0,
            num_tokens=8,
            offer_id=plan.offer_id,
            token=plan.token,
        )
    )
    assert made == ticket_for(pw.handshake, plan, 30.0)


def test_a_failed_load_is_reported_with_its_blocks_in_the_same_step(workers) -> None:
    pkv, dkv = FakeKV(seed=3), FakeKV()
    pw, dw = workers["make"](pkv), workers["make"](dkv)
    p, params = _handoff(pkv, pw, 8, [1, 2])
    # the prefill gives the request up before the decode comes (its offer is aborted)
    pw._thread.call(pw.engine.handoff.abort("r1"))
    d = SchedulerSide(_cfg(), BS)
    req = _decode_req(params, prompt=8)
    d.after_alloc(req, lambda: [7, 8], 8)
    dw.start(d.build_plan({}, (), lambda r: []))
    got = _results(dw, "finished_recving")
    assert got.finished_recving == got.failed_recving == {"d1"}
    assert got.failed_block_ids == {7, 8}
    pw.start(p.sched.build_plan({}, (), p.tables.__getitem__))
    assert _results(pw, "finished_sending").finished_sending == {"r1"}
    failed = dw.transfer_stats.take()
    assert failed is not None and failed[stats.LOADS_FAILED] == 1
    assert not failed[stats.LOAD_SECONDS]


def test_a_decode_that_never_comes_frees_the_prefill_at_lease_end(workers) -> None:
    pkv = FakeKV(seed=3)
    pw = workers["make"](pkv, lease_s=0.3)  # the worker's offer carries the lease
    p, _ = _handoff(pkv, pw, 8, [1, 2], lease_s=0.3)
    pw.start(p.sched.build_plan({}, (), p.tables.__getitem__))
    assert _results(pw, "finished_sending").finished_sending == {"r1"}

    async def stats() -> dict:
        return pw.engine.handoff.stats()

    # freed by the lease running out (the offer expired), not by anything a decode did
    ends = pw._thread.call(stats())["per_peer"][-1]  # -1: offers nobody claimed
    assert [ends.get(k, 0) for k in ("expired", "done", "aborted")] == [1, 0, 0], ends


def test_a_full_hit_on_the_decode_frees_the_prefill_now(workers) -> None:
    pkv, dkv = FakeKV(seed=3), FakeKV()
    pw, dw = workers["make"](pkv), workers["make"](dkv)
    p, params = _handoff(pkv, pw, 8, [1, 2])  # lease 30 s: the release must come first
    pw.start(p.sched.build_plan({}, (), p.tables.__getitem__))
    d = SchedulerSide(_cfg(), BS)
    req = _decode_req(params, prompt=8)
    d.after_alloc(req, list, 0)
    dw.start(d.build_plan({}, (), lambda r: []))
    assert _results(pw, "finished_sending", deadline_s=20).finished_sending == {"r1"}
    assert dw.results() == TransferResults()  # nothing parked, nothing to report


def test_a_decode_aborted_before_its_fetch_ran_reports_it(workers) -> None:
    dkv = FakeKV()
    dw = workers["make"](dkv)
    hs = dict(dw.handshake.to_dict(), cluster_id=424242, endpoint="127.0.0.1:9")  # nobody
    p = Prefill(_cfg(), {0: hs})
    req = _prefill_req("r1", 8)
    p.schedule(req, [1, 2], 8)
    _, params = p.finish(req)
    assert params is not None
    d = SchedulerSide(_cfg(), BS)
    dreq = _decode_req(params, prompt=8)
    d.after_alloc(dreq, lambda: [3, 4], 8)
    dw.start(d.build_plan({}, (), lambda r: []))
    assert d.request_finished(dreq, [3, 4]) == (False, None)  # the client went away
    dw.start(d.build_plan({}, (), lambda r: []))  # cancels it, maybe before it ran
    got = _results(dw, "finished_recving")
    assert got.finished_recving == got.failed_recving == {"d1"}
    assert dw.stats()["fetches"] == 0


def test_a_decode_aborted_mid_fetch_frees_both_sides(workers) -> None:
    pkv, dkv = FakeKV(seed=3), FakeKV()
    pw, dw = workers["make"](pkv), workers["make"](dkv)
    dw.engine.handoff.max_fetches = 0  # every fetch waits for a slot (renewing its lease)
    p, params = _handoff(pkv, pw, 8, [1, 2])
    pw.start(p.sched.build_plan({}, (), p.tables.__getitem__))
    d = SchedulerSide(_cfg(), BS)
    dreq = _decode_req(params, prompt=8)
    d.after_alloc(dreq, lambda: [3, 4], 8)
    dw.start(d.build_plan({}, (), lambda r: []))
    wait_until(lambda: dw.stats()["fetches"] == 1, 20, "the fetch to wait")
    assert d.request_finished(dreq, [3, 4]) == (False, None)
    dw.start(d.build_plan({}, (), lambda r: []))
    got = _results(dw, "finished_recving")
    assert got.finished_recving == got.failed_recving == {"d1"}
    assert _results(pw, "finished_sending", 20).finished_sending == {"r1"}  # released, no lease
    assert not dkv.block(0, 3).any()
    assert dw.transfer_stats.take() is None  # a load the decode cancelled is not a failure


def test_decode_blocks_that_do_not_fit_the_offer_fail_the_load_and_release(workers) -> None:
    dw = workers["make"](FakeKV())
    d = SchedulerSide(_cfg(), BS)
    req = _decode_req(_offered_params())  # 3 blocks offered
    d.after_alloc(req, lambda: [7], 10, hit_blocks=0)  # but only 1 new block
    plan = d.build_plan({}, (), lambda r: [])
    [load] = plan.loads
    assert load.refused and load.block_ids == (7,)
    assert len(plan.releases) == 1  # the prefill need not wait for its lease
    dw.start(plan)
    got = _results(dw, "finished_recving")
    assert got.finished_recving == got.failed_recving == {"d1"}
    assert got.failed_block_ids == {7}


def test_the_dropped_offer_is_never_reported(workers) -> None:
    pkv = FakeKV(seed=3)
    pw = workers["make"](pkv)
    p = Prefill(_cfg(), {0: pw.handshake})
    req = _prefill_req("r1", 8)
    plan = p.schedule(req, [1, 2], 8)
    pw.start(plan)
    pw.after_forward(plan)
    assert p.finish(req, Status("FINISHED_ABORTED")) == (False, None)
    pw.start(p.sched.build_plan({}, (), p.tables.__getitem__))
    wait_until(lambda: pw.engine.handoff.live() == 0, 20, "the offer to end")
    assert pw.results() == TransferResults()
    assert pw.stats() == {
        "fetches": 0,
        "offers_made": 0,
        "ended_undecided": 0,
        "handed": 0,
        "dropped": 0,
    }


def test_timing_stamps_follow_a_request_through_both_sides(workers, caplog) -> None:
    """At DEBUG on dxl.vllm.timing, each side stamps the request's events in order, and the
    decode's first step after the load is marked in the plan for its workers."""
    caplog.set_level(logging.DEBUG, logger="dxl.vllm.timing")
    pkv, dkv = FakeKV(seed=5), FakeKV()
    pw, dw = workers["make"](pkv), workers["make"](dkv)
    _, params = _handoff(pkv, pw, 10, [4, 5, 6])
    d = SchedulerSide(_cfg(), BS)
    req = _decode_req(params)
    count, _ = d.num_new_matched_tokens(req, 0)
    d.after_alloc(req, lambda: [10, 11, 12], count)
    dw.start(d.build_plan({}, (), lambda r: []))
    d.finished_recving(_results(dw, "finished_recving").finished_recving)
    assert d.build_plan({}, (), lambda r: []).timed == []  # not scheduled yet: not its step
    first = d.build_plan({"d1": 1}, (), lambda r: [])
    assert first.timed == ["d1"]
    dw.after_forward(first)
    assert d.build_plan({"d1": 1}, (), lambda r: []).timed == []  # only its first step
    events: dict[str, list[str]] = {}
    for rec in caplog.records:
        m = re.fullmatch(r"dxl: timing (\S+) (\S+) t=[\d.]+( .*)?", rec.getMessage())
        assert m is not None, rec.getMessage()
        events.setdefault(m.group(2), []).append(m.group(1))
    assert events["r1"] == ["prefill-scheduled", "offered", "tickets-built"]
    assert events["d1"] == [
        "ticket-checked",
        "load-planned",
        "load-started",
        "fetch-start",
        "fetch-end",
        "load-returned",
        "load-noticed",
        "decode-scheduled",
        "first-step-done",
    ]
    fetch = next(r.getMessage() for r in caplog.records if "fetch-start" in r.getMessage())
    assert fetch.endswith("link=cold")  # the decode's first fetch from this prefill links


def test_timing_stamps_are_off_by_default(workers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="dxl.vllm.timing")
    pkv = FakeKV(seed=6)
    pw = workers["make"](pkv)
    _, params = _handoff(pkv, pw, 10, [4, 5, 6])
    d = SchedulerSide(_cfg(), BS)
    req = _decode_req(params)
    count, _ = d.num_new_matched_tokens(req, 0)
    d.after_alloc(req, lambda: [10, 11, 12], count)
    d.finished_recving(["d1"])
    assert d.build_plan({"d1": 1}, (), lambda r: []).timed == []  # nothing tracked either
    assert not [r for r in caplog.records if r.name == "dxl.vllm.timing"]


def test_an_idle_step_waiting_on_a_load_reports_it_once(workers) -> None:
    """``idle_wait_s``: an idle step's results wait for the load in flight (bounded), and the
    load is still reported exactly once, whether it landed in that wait or later."""
    pkv, dkv = FakeKV(seed=7), FakeKV()
    pw, dw = workers["make"](pkv), workers["make"](dkv, idle_wait_s=1)
    _, params = _handoff(pkv, pw, 10, [4, 5, 6])
    d = SchedulerSide(_cfg(), BS)
    req = _decode_req(params)
    count, _ = d.num_new_matched_tokens(req, 0)
    d.after_alloc(req, lambda: [10, 11, 12], count)
    plan = d.build_plan({}, (), lambda r: [])
    assert plan.idle  # nothing scheduled: a step without a forward
    dw.start(plan)
    seen: set[str] = set()

    def poll() -> bool:
        r = dw.results(d.build_plan({}, (), lambda r: []))
        assert not (seen & r.finished_recving), "reported twice"
        seen.update(r.finished_recving)
        return bool(seen)

    wait_until(poll, 30, "the load reported")
    assert seen == {"d1"}
    assert dw.results(d.build_plan({}, (), lambda r: [])) == TransferResults()  # no wait: none
    assert dw.stats()["fetches"] == 0
    for src, dst in zip([4, 5, 6], [10, 11, 12], strict=True):
        np.testing.assert_array_equal(dkv.block(0, dst), pkv.block(0, src))
    assert not d.build_plan({"d1": 1}, (), lambda r: []).idle
