"""The vLLM connector's trust boundary: what a client (or a proxy) can put in a request's
``kv_transfer_params``, and what an operator can put in ``kv_connector_extra_config``.

The scheduler side is driven as vLLM's scheduler drives it (ask for the matched tokens, allocate
that many, tell the connector the new blocks, build the step) against the connector's real code,
without vLLM. Every malformed, inconsistent or foreign ticket must end as a *failed load* of that
request (reported by the worker side with its blocks, so vLLM's ``kv_load_failure_policy``
applies), never as an exception in a scheduler hook, never as a claim of tokens the ticket's
blocks do not verifiably hold, and never as a release of somebody else's offer.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import pytest
from vllm_fakes import Req, Status, prompt_of

import dxl.config
from dxl.errors import LLMException, LLMStatusCode
from dxl.handoff.ticket import MAX_TICKET_BLOCKS, Ticket
from dxl.integrations.vllm import config as vllm_config
from dxl.integrations.vllm.config import DxlConnectorConfig
from dxl.integrations.vllm.params import MAX_RANKS, prompt_digest
from dxl.integrations.vllm.scheduler import PARAMS_KEY, SchedulerSide, StepPlan
from dxl.integrations.vllm.worker import WorkerSide

BS = 4  # tokens per block
DONE = Status("FINISHED_LENGTH_CAPPED")
HS = {"cluster_id": 7, "incarnation": "i7", "endpoint": "127.0.0.1:9", "cache_id": 1,
      "block_bytes": 128, "num_tensors": 3, "tensors_per_layer": 1}  # fmt: skip
NAN, INF = float("nan"), float("inf")
HUGE = 10**5000  # a 5001-digit integer (int("9" * 5000) is refused by Python itself)


def _id(value: Any) -> str:
    """A short test id (repr of HUGE raises: Python refuses to print 5000 digits)."""
    try:
        text = repr(value)
    except ValueError:
        return f"huge {type(value).__name__}"
    return text if len(text) <= 24 else f"{type(value).__name__}[{len(value)}]"


# ====================================================================== driving it as vLLM does
def prefill_params(ids: list[int], ranks: int = 1, block_size: int = BS) -> dict[str, Any]:
    """The kv_transfer_params a prefill of prompt ``ids`` returns (tickets and all)."""
    sched = SchedulerSide(DxlConnectorConfig(), block_size)
    sched.set_handshake({r: dict(HS, cluster_id=7 + r) for r in range(ranks)})
    req = Req("p1", len(ids), {"do_remote_decode": True}, prompt_token_ids=list(ids))
    blocks = list(range(1, 1 + -(-len(ids) // block_size)))
    sched.after_alloc(req, list, 0)
    [offer] = sched.build_plan({"p1": len(ids)}, (), lambda r: blocks).offers
    req.num_computed_tokens, req.status = len(ids), DONE
    delay, params = sched.request_finished(req, blocks)
    assert delay is True and params is not None and offer.block_ids == tuple(blocks)
    return params


@dataclass
class Step:
    count: int
    load_async: bool
    new: list[int]
    plan: StepPlan


def schedule(
    sched: SchedulerSide, req: Req, hit: int = 0, extra_blocks: int = 0, external: int | None = None
) -> Step:
    """One scheduling pass of a waiting decode request with a ``hit``-token local prefix hit:
    vLLM asks (twice: no side effects), allocates blocks for the claimed tokens (``extra_blocks``
    more, or ``external`` tokens told instead, to play a scheduler that disagrees), tells the
    connector, and builds the step."""
    count, load_async = sched.num_new_matched_tokens(req, hit)
    assert sched.num_new_matched_tokens(req, hit) == (count, load_async)
    assert count >= 0 and (count > 0) == load_async
    new: list[int] = []
    if load_async:
        n_new = -(-(hit + count) // BS) - hit // BS + extra_blocks
        new = list(range(100, 100 + n_new))
    told = external if external is not None else (count if load_async else 0)
    sched.after_alloc(req, lambda: new, told, hit // BS)
    return Step(count, load_async, new, sched.build_plan({}, (), lambda r: []))


def decode_req(params: Any, ids: list[int]) -> Req:
    return Req("d1", len(ids), params, prompt_token_ids=list(ids))


def assert_failed_load(step: Step, why: str = "") -> str:
    """The request was parked for one block and its load failed at once, reported by the
    worker side in the same step with that block; nothing released, nothing else claimed."""
    assert step.load_async and 0 < step.count <= BS
    [load] = step.plan.loads
    assert load.request_id == "d1" and load.refused and load.tickets == ()
    assert load.block_ids == tuple(step.new) and len(step.new) == 1
    assert why in load.refused, load.refused
    assert step.plan.releases == []
    worker = WorkerSide(DxlConnectorConfig())  # unregistered: every load fails (as refused)
    worker.start(step.plan)
    got = worker.results()
    assert got.finished_recving == got.failed_recving == {"d1"}
    assert got.failed_block_ids == set(step.new)
    return load.refused


def attempt(params: Any, ids: list[int], hit: int = 0) -> tuple[SchedulerSide, Req, Step]:
    sched = SchedulerSide(DxlConnectorConfig(), BS)
    req = decode_req(params, ids)
    step = schedule(sched, req, hit)
    return sched, req, step


def done(sched: SchedulerSide, req: Req) -> None:
    """The request ends; nothing is left behind and it is handled once."""
    assert sched.num_new_matched_tokens(req, 0) == (0, False)  # handled: never again
    sched.finished_recving({"d1"})
    assert sched.request_finished(req, [100]) == (False, None)
    assert sched.pending() == {"producing": 0, "offered": 0, "loading": 0, "claims": 0}


A = prompt_of(10)  # 3 blocks of 4, the last one half full


# ====================================================================== item 5: malformed tickets
def _with(params: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(params)
    out[PARAMS_KEY][0].update(changes)
    return out


def _without(params: dict[str, Any], key: str) -> dict[str, Any]:
    out = copy.deepcopy(params)
    del out[PARAMS_KEY][0][key]
    return out


BAD_VALUES = ["10", "1e3", [10], {"n": 10}, True, NAN, INF, -INF, -10, 10.0, 9.5, HUGE, -HUGE]


@pytest.mark.parametrize("value", [*BAD_VALUES, None], ids=_id)
def test_a_bad_num_tokens_is_a_failed_load_not_an_exception(value: Any) -> None:
    good = prefill_params(A)
    sched, req, step = attempt(_with(good, num_tokens=value), A)
    assert_failed_load(step)
    done(sched, req)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("block_ids", "1,2,3"),
        ("block_ids", {"0": 1}),
        ("block_ids", None),
        ("block_ids", [1, 2, -3]),
        ("block_ids", [1, 2, 1 << 64]),
        ("block_ids", [1, 2, True]),
        ("block_ids", [1, 2, NAN]),
        ("block_ids", [1, 2, HUGE]),
        ("block_ids", []),
        ("block_ids", list(range(MAX_TICKET_BLOCKS + 1))),
        ("offer_id", "12"),
        ("offer_id", -1),
        ("offer_id", INF),
        ("token", 1234),
        ("token", ["t"]),
        ("token", "t" * 5000),
        ("cluster_id", False),
        ("cache_id", None),
        ("endpoint", 9),
        ("kind", "push"),
        ("kind", "PULL"),
        ("layers", [0, 1, 2]),
        ("layers", "01"),
        ("layers", [2, 1]),
        ("tensors_per_layer", 0),
        ("lease_ms", -5),
        ("v", 2),
        ("v", True),
        ("v", 1.0),
        ("v", "1"),
        ("prompt_digest", "A" * 64),
        ("prompt_digest", "a" * 63),
        ("prompt_digest", 0),
        ("prompt_digest", ["a" * 64]),
    ],
    ids=_id,
)
def test_a_malformed_ticket_field_is_a_failed_load(field: str, value: Any) -> None:
    good = prefill_params(A)
    sched, req, step = attempt(_with(good, **{field: value}), A)
    assert_failed_load(step)
    done(sched, req)


@pytest.mark.parametrize("field", ["v", "kind", "token", "block_ids", "offer_id", "num_tokens",
                                   "prompt_digest", "endpoint"])  # fmt: skip
def test_a_ticket_missing_a_field_is_a_failed_load(field: str) -> None:
    sched, req, step = attempt(_without(prefill_params(A), field), A)
    assert_failed_load(step)
    done(sched, req)


@pytest.mark.parametrize(
    "tickets",
    [None, "ticket", 7, {"v": 1}, [], [None], ["{}"], [[1, 2]], [{}], [NAN], "x" * 100_000],
    ids=_id,
)
def test_a_bad_ticket_list_is_a_failed_load(tickets: Any) -> None:
    params = {"do_remote_prefill": True, PARAMS_KEY: tickets}
    if tickets is None:
        del params[PARAMS_KEY]
    sched, req, step = attempt(params, A)
    assert_failed_load(step)
    done(sched, req)


def test_too_many_tickets_or_not_one_per_rank_is_a_failed_load() -> None:
    good = prefill_params(A)
    flood = {"do_remote_prefill": True, PARAMS_KEY: good[PARAMS_KEY] * (MAX_RANKS + 1)}
    assert_failed_load(attempt(flood, A)[2], "tickets")
    # a decode of 2 tensor-parallel ranks given the tickets of a 1-rank prefill
    sched = SchedulerSide(DxlConnectorConfig(), BS)
    sched.set_handshake({0: HS, 1: dict(HS, cluster_id=8)})
    assert_failed_load(schedule(sched, decode_req(good, A)), "tensor-parallel")


@pytest.mark.parametrize("flag", ["true", "false", 1, 0, 1.0, [], {}, "yes"], ids=_id)
def test_do_remote_prefill_must_be_a_boolean(flag: Any) -> None:
    params = dict(prefill_params(A), do_remote_prefill=flag)
    sched, req, step = attempt(params, A)
    assert_failed_load(step, "do_remote_prefill must be true or false")
    assert params["do_remote_prefill"] is False  # handled once
    done(sched, req)


def test_both_flags_is_a_failed_load_not_a_request_parked_forever() -> None:
    # once asked for a load and then taken for a prefill, vLLM would wait for a load never made
    params = dict(prefill_params(A), do_remote_decode=True)
    sched, req, step = attempt(params, A)
    assert_failed_load(step, "both")
    assert sched.pending()["producing"] == 0
    done(sched, req)


@pytest.mark.parametrize("params", [[1, 2], "do_remote_prefill", 5, NAN, ("a",)], ids=_id)
def test_params_that_are_not_an_object_are_ignored_without_an_exception(params: Any) -> None:
    sched = SchedulerSide(DxlConnectorConfig(), BS)
    req = decode_req(params, A)
    step = schedule(sched, req)
    assert (step.count, step.load_async) == (0, False)  # computed locally: nothing claimed
    assert step.plan.empty()
    assert sched.request_finished(req, [1, 2, 3]) == (False, None)
    assert sched.build_plan({}, (), lambda r: []).empty()


@pytest.mark.parametrize("flag", ["true", 1, [True]], ids=_id)
def test_a_prefill_flag_that_is_not_a_boolean_makes_no_offer(flag: Any) -> None:
    sched = SchedulerSide(DxlConnectorConfig(), BS)
    sched.set_handshake({0: HS})
    req = Req("p1", 8, {"do_remote_decode": flag})
    sched.after_alloc(req, list, 0)
    assert sched.build_plan({"p1": 8}, (), lambda r: [1, 2]).offers == []
    req.num_computed_tokens, req.status = 8, DONE
    assert sched.request_finished(req, [1, 2]) == (False, None)


def test_only_the_parsed_ticket_reaches_the_workers() -> None:
    good = prefill_params(A)
    stuffed = _with(good, evil="x" * 100_000, num_tokens=10)
    _, _, step = attempt(stuffed, A)
    [load] = step.plan.loads
    assert not load.refused
    assert load.tickets == (Ticket.from_dict(good[PARAMS_KEY][0]).to_dict(),)
    assert "evil" not in load.tickets[0]


def test_a_flood_of_bad_tickets_logs_a_bounded_number_of_lines(caplog) -> None:
    good = prefill_params(A)
    sched = SchedulerSide(DxlConnectorConfig(), BS)
    with caplog.at_level(logging.WARNING, logger="dxl.vllm"):
        for i in range(200):
            req = Req(f"d{i}", len(A), _with(good, num_tokens="x"), prompt_token_ids=list(A))
            schedule(sched, req)
    assert 1 <= len(caplog.records) < 50  # a burst per window, then counted


def test_ticket_from_dict_bounds_what_it_reads() -> None:
    good = prefill_params(A)[PARAMS_KEY][0]
    at_bound = dict(good, block_ids=[1] * MAX_TICKET_BLOCKS)
    assert len(Ticket.from_dict(at_bound).block_ids) == MAX_TICKET_BLOCKS
    for raw in (
        dict(good, block_ids=[1] * (MAX_TICKET_BLOCKS + 1)),  # refused before it is read
        dict(good, layers=[0, 1, 2]),
        dict(good, num_tokens=HUGE),
        dict(good, v=True),
    ):
        with pytest.raises(LLMException) as err:
            Ticket.from_dict(raw)
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(LLMException) as err:  # 5000 digits: json refuses it, and so do we
        Ticket.from_json('{"v": 1, "num_tokens": ' + "9" * 5000 + "}")
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID


@pytest.mark.parametrize("version", [True, 1.0], ids=_id)
def test_ticket_version_must_be_the_integer_1(version: Any) -> None:
    raw = dict(prefill_params(A)[PARAMS_KEY][0], v=version)
    with pytest.raises(LLMException, match="version"):
        Ticket.from_dict(raw)


# ====================================================================== item 6: stale KV
def _forged(ids: list[int], num_tokens: int, blocks: int) -> dict[str, Any]:
    """Tickets for ``blocks`` blocks that claim ``num_tokens`` tokens of ``ids``, with a
    correct digest (anyone who knows the prompt can compute it: it is no secret)."""
    params = prefill_params(ids)
    t = params[PARAMS_KEY][0]
    t["block_ids"] = list(range(1, blocks + 1))
    t["num_tokens"] = num_tokens
    t["prompt_digest"] = prompt_digest(ids, num_tokens, BS)
    return params


@pytest.mark.parametrize(
    ("num_tokens", "blocks"), [(100, 1), (100, 24), (100, 26), (9, 1), (4, 2), (1, 3)]
)
def test_tokens_claimed_never_exceed_what_the_blocks_hold(num_tokens: int, blocks: int) -> None:
    ids = prompt_of(num_tokens)
    sched, req, step = attempt(_forged(ids, num_tokens, blocks), ids)
    assert_failed_load(step, "cannot hold exactly")  # vLLM allocates (and fails) one block
    done(sched, req)


@pytest.mark.parametrize("prompt", [1, 3, 4, 5, 8, 10, 17, 64])
@pytest.mark.parametrize("hit_blocks", [0, 1, 2, 3])
def test_the_blocks_loaded_cover_exactly_the_tokens_claimed(prompt: int, hit_blocks: int) -> None:
    ids = prompt_of(prompt)
    hit = min(hit_blocks * BS, (prompt - 1) // BS * BS)  # vLLM's hit never covers the prompt
    _, _, step = attempt(prefill_params(ids), ids, hit)
    offered = -(-prompt // BS)
    assert step.load_async and hit + step.count == prompt
    [load] = step.plan.loads
    assert not load.refused and load.block_ids == tuple(step.new)
    assert len(load.block_ids) == offered - hit // BS  # the blocks past the hit, no more
    assert step.plan.releases == []
    # the same blocks claiming a block's worth more tokens (of a prompt that long, correctly
    # digested): vLLM would allocate a block more and count its stale KV as computed
    longer = prompt_of(prompt + BS)
    _, _, step = attempt(_forged(longer, prompt + BS, offered), longer, hit)
    assert_failed_load(step, "cannot hold exactly")


@pytest.mark.parametrize(("extra_blocks", "external"), [(1, None), (-1, None), (0, 9), (0, 11)])
def test_an_allocation_that_does_not_match_the_claim_fails_the_load(
    extra_blocks: int, external: int | None
) -> None:
    # vLLM counts every block the request holds as computed: a block more than the offer fills
    # would be stale KV; one fewer, or tokens told that were not claimed, cannot be loaded
    sched = SchedulerSide(DxlConnectorConfig(), BS)
    req = decode_req(prefill_params(A), A)
    step = schedule(sched, req, extra_blocks=extra_blocks, external=external)
    [load] = step.plan.loads
    assert load.refused and load.tickets == () and load.block_ids == tuple(step.new)
    assert len(step.plan.releases) == 1  # this prompt's offer: the prefill need not wait
    done(sched, req)


# ====================================================================== item 7: prompt binding
def test_the_prefills_ticket_carries_its_prompts_digest() -> None:
    params = prefill_params(A)
    [t] = params[PARAMS_KEY]
    assert t["prompt_digest"] == prompt_digest(A, len(A), BS)
    assert t["num_tokens"] == len(A) and len(t["block_ids"]) == 3
    assert prompt_digest(A, len(A), BS) != prompt_digest(A, len(A), 8)  # block size bound in
    assert prompt_digest(A, 9, BS) != prompt_digest(A, 10, BS)
    _, _, step = attempt(params, A)  # its own prompt: loads
    assert step.count == len(A) and not step.plan.loads[0].refused


OTHER_PROMPTS = {
    "another prompt": prompt_of(10, seed=1),
    "first token differs": [A[0] + 1, *A[1:]],
    "a middle token differs": [*A[:5], A[5] + 1, *A[6:]],
    "last token differs": [*A[:-1], A[-1] + 1],
    "two tokens swapped": [A[1], A[0], *A[2:]],
    "shorter (a block prefix)": A[:8],
    "shorter by one": A[:9],
    "longer by one": [*A, 5],
    "longer by a block": [*A, 5, 6, 7, 8],
}


@pytest.mark.parametrize("other", OTHER_PROMPTS.values(), ids=OTHER_PROMPTS.keys())
@pytest.mark.parametrize("hit", [0, 4])
def test_tickets_of_another_prompt_are_a_failed_load(other: list[int], hit: int) -> None:
    sched, req, step = attempt(prefill_params(A), other, hit)
    assert_failed_load(step)
    done(sched, req)


@pytest.mark.parametrize("other", [prompt_of(10, seed=1), [*A[:-1], A[-1] + 1]])
def test_a_decode_never_releases_the_offer_of_another_prompt(other: list[int]) -> None:
    # releasing would abort a handoff that belongs to another request (the one the proxy
    # took the tickets from): neither an early abort nor a full local hit may do it
    sched = SchedulerSide(DxlConnectorConfig(), BS)
    early = decode_req(prefill_params(A), other)
    assert sched.request_finished(early, []) == (False, None)
    full_hit = decode_req(prefill_params(A), other)
    sched.after_alloc(full_hit, list, 0)
    assert sched.build_plan({}, (), lambda r: []).releases == []
    mine = decode_req(prefill_params(A), A)  # the same, with its own prompt, does release
    assert sched.request_finished(mine, []) == (False, None)
    assert len(sched.build_plan({}, (), lambda r: []).releases) == 1


def test_a_ticket_without_a_digest_binds_nothing() -> None:
    params = prefill_params(A)
    params[PARAMS_KEY][0]["prompt_digest"] = None  # what a prefill of older code sends
    sched, req, step = attempt(params, A)
    assert_failed_load(step, "binds no prompt")
    done(sched, req)


def test_a_decode_without_prompt_token_ids_cannot_check_and_fails_the_load() -> None:
    sched = SchedulerSide(DxlConnectorConfig(), BS)
    req = decode_req(prefill_params(A), A)
    req.prompt_token_ids = None  # e.g. a prompt given as embeddings
    assert_failed_load(schedule(sched, req), "not known")


def test_a_prefill_without_prompt_token_ids_hands_out_no_ticket() -> None:
    sched = SchedulerSide(DxlConnectorConfig(), BS)
    sched.set_handshake({0: HS})
    req = Req("p1", 8, {"do_remote_decode": True}, prompt_token_ids=None)
    req.prompt_token_ids = None
    sched.after_alloc(req, list, 0)
    [offer] = sched.build_plan({"p1": 8}, (), lambda r: [1, 2]).offers
    req.num_computed_tokens, req.status = 8, DONE
    assert sched.request_finished(req, [1, 2]) == (False, None)
    assert sched.build_plan({}, (), lambda r: []).dropped == [offer.offer_id]


def test_a_decode_of_another_block_size_fails_the_load() -> None:
    ids = prompt_of(16)
    params = prefill_params(ids, block_size=8)  # 2 blocks of 8
    params[PARAMS_KEY][0]["block_ids"] = [1, 2, 3, 4]  # even if the block count fits ours
    assert_failed_load(attempt(params, ids)[2], "another prompt")


def test_ranks_that_disagree_fail_the_load() -> None:
    params = prefill_params(A, ranks=2)
    params[PARAMS_KEY][1]["prompt_digest"] = prompt_digest(prompt_of(10, seed=1), 10, BS)
    sched = SchedulerSide(DxlConnectorConfig(), BS)
    sched.set_handshake({0: HS, 1: dict(HS, cluster_id=8)})
    assert_failed_load(schedule(sched, decode_req(params, A)), "disagree")


# ====================================================================== item 8: typed options
_NOT_BOOLEANS: list[Any] = ["false", "true", "0", "", 0, 1, [], {}]


@pytest.mark.parametrize(
    ("key", "value"),
    [("allow_remote_listen", v) for v in [*_NOT_BOOLEANS, None]]
    # share_registered: null is its default (dxl decides), see the next test
    + [("share_registered", v) for v in _NOT_BOOLEANS],
    ids=_id,
)
def test_a_boolean_option_must_be_a_boolean(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"{key} must be true or false"):
        DxlConnectorConfig.from_extra({key: value})


def test_share_registered_is_left_to_dxl_unless_set() -> None:
    """Unset (or null), the connector emits no dxl.ShareRegistered: the engine's automatic
    default applies. A boolean is passed on as "1" / "0" (the opt-out)."""
    key = dxl.config.OPT_SHARE_REGISTERED
    assert DxlConnectorConfig().share_registered is None
    assert key not in DxlConnectorConfig.from_extra({}).engine_options(0)
    assert key not in DxlConnectorConfig.from_extra({"share_registered": None}).engine_options(0)
    off = DxlConnectorConfig.from_extra({"share_registered": False}).engine_options(0)
    assert off[key] == "0"


def test_the_false_string_no_longer_opens_an_unauthenticated_listener() -> None:
    with pytest.raises(ValueError, match="allow_remote_listen"):
        DxlConnectorConfig.from_extra({"listen": "0.0.0.0:27000", "allow_remote_listen": "false"})
    cfg = DxlConnectorConfig.from_extra({"allow_remote_listen": False, "share_registered": True})
    opts = cfg.engine_options(0)
    assert dxl.config.OPT_ALLOW_REMOTE_LISTEN not in opts
    assert opts[dxl.config.OPT_SHARE_REGISTERED] == "1"
    on = DxlConnectorConfig.from_extra({"allow_remote_listen": True}).engine_options(0)
    assert on[dxl.config.OPT_ALLOW_REMOTE_LISTEN] == "1"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"lease_s": "30"}, "lease_s must be a number"),
        ({"lease_s": True}, "lease_s must be a number"),
        ({"lease_s": HUGE}, "lease_s must be in"),
        ({"lease_s": [30]}, "lease_s must be a number"),
        ({"fetch_timeout_s": "10"}, "fetch_timeout_s must be a number"),
        ({"fetch_timeout_s": HUGE}, "fetch_timeout_s must be in"),
        ({"idle_wait_s": -0.001}, r"idle_wait_s must be in \[0, 1\]"),
        ({"idle_wait_s": 2}, r"idle_wait_s must be in \[0, 1\]"),
        ({"idle_wait_s": "0"}, "idle_wait_s must be a number"),
        ({"gil_switch_s": float("nan")}, "gil_switch_s must be in"),
        ({"gil_switch_s": 1}, r"gil_switch_s must be in \[0, 0.1\]"),
        ({"listen": 27000}, "listen must be a string"),
        ({"listen": ["127.0.0.1:1"]}, "listen must be a string"),
        ({"listen": "127.0.0.1:\u00b2"}, "listen must be 'host:port'"),
        ({"listen": "x" * 5000}, "listen must be at most 4096 characters"),
        ({"transport": 1}, "transport must be a string"),
        ({"transport": ["tcp"]}, "transport must be a string"),
        ({"secret": 1234}, "secret must be a non-empty string"),
        ({"secret": ""}, "secret must be a non-empty string"),
        ({"secret_env": 5}, "secret_env must be a string"),
        ({"secret_file": ["/etc/passwd"]}, "secret_file must be a string"),
        ({"dxl": "listen"}, "key 'dxl' must be an object"),
    ],
    ids=_id,
)
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(extra: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DxlConnectorConfig.from_extra(extra)


@pytest.mark.parametrize("extra", [[("listen", "x")], "listen=x", 5], ids=_id)
def test_extra_config_must_be_an_object(extra: Any) -> None:
    with pytest.raises(ValueError, match="must be an object"):
        DxlConnectorConfig.from_extra(extra)


def test_numbers_may_be_ints_and_transports_are_the_engines() -> None:
    cfg = DxlConnectorConfig.from_extra({"lease_s": 5, "fetch_timeout_s": 2.5})
    assert (cfg.lease_s, cfg.fetch_timeout_s) == (5.0, 2.5)
    assert isinstance(cfg.lease_s, float)
    off = DxlConnectorConfig.from_extra({"idle_wait_s": 0, "gil_switch_s": 0})
    assert (off.idle_wait_s, off.gil_switch_s) == (0.0, 0.0)  # 0: off, as documented
    # one list of transport names (the config module imports it, it does not define one)
    assert vllm_config.TRANSPORTS is dxl.config.TRANSPORTS  # type: ignore[attr-defined]
    for name in dxl.config.TRANSPORTS:
        opts = DxlConnectorConfig.from_extra({"transport": name}).engine_options(2)
        assert opts[dxl.config.OPT_TRANSPORT] == name
        assert opts[dxl.config.OPT_LISTEN_IP_INFO] == "127.0.0.1:0"


# ====================================================================== item 13: the secret
SECRET = "s3cret-Zq81-never-logged"


def _no_secret_anywhere(cfg: DxlConnectorConfig, caplog) -> None:
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_secret_env_gives_the_secret_by_reference(monkeypatch, caplog) -> None:
    monkeypatch.setenv("DXL_TEST_VLLM_SECRET", SECRET)
    with caplog.at_level(logging.DEBUG):
        cfg = DxlConnectorConfig.from_extra({"secret_env": "DXL_TEST_VLLM_SECRET"})
        assert cfg.engine_options(0)[dxl.config.OPT_AUTH_TOKEN] == SECRET
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    _no_secret_anywhere(cfg, caplog)


@pytest.mark.parametrize("ending", ["", "\n", "\r\n"], ids=_id)
def test_secret_file_gives_the_secret_by_reference(tmp_path, caplog, ending: str) -> None:
    path = tmp_path / "secret"
    path.write_bytes((SECRET + ending).encode())
    with caplog.at_level(logging.DEBUG):
        cfg = DxlConnectorConfig.from_extra({"dxl": {"secret_file": str(path)}})
        assert cfg.engine_options(1)[dxl.config.OPT_AUTH_TOKEN] == SECRET
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    _no_secret_anywhere(cfg, caplog)


def test_a_secret_reference_that_cannot_be_read_is_refused_at_start_up(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("DXL_TEST_VLLM_UNSET", raising=False)
    monkeypatch.setenv("DXL_TEST_VLLM_EMPTY", "")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "newline").write_bytes(b"\n")
    (tmp_path / "big").write_bytes(b"x" * 5000)
    (tmp_path / "binary").write_bytes(b"\xff\xfe\n")
    cases = [
        ({"secret_env": "DXL_TEST_VLLM_UNSET"}, "secret_env.*DXL_TEST_VLLM_UNSET.*not set"),
        ({"secret_env": "DXL_TEST_VLLM_EMPTY"}, "secret_env.*not set or empty"),
        ({"secret_env": "NOT A NAME"}, "secret_env must be an environment variable's name"),
        ({"secret_file": str(tmp_path / "missing")}, "secret_file.*cannot be read"),
        ({"secret_file": str(tmp_path)}, "secret_file.*cannot be read"),  # a directory
        ({"secret_file": str(tmp_path / "empty")}, "secret_file.*is empty"),
        ({"secret_file": str(tmp_path / "newline")}, "secret_file.*is empty"),
        ({"secret_file": str(tmp_path / "big")}, "secret_file.*at most 4096 bytes"),
        ({"secret_file": str(tmp_path / "binary")}, "secret_file.*UTF-8"),
    ]
    for extra, match in cases:
        with pytest.raises(ValueError, match=match):
            DxlConnectorConfig.from_extra(extra)


def test_at_most_one_way_to_give_the_secret(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DXL_TEST_VLLM_SECRET", SECRET)
    path = tmp_path / "secret"
    path.write_text(SECRET)
    for extra in (
        {"secret": SECRET, "secret_env": "DXL_TEST_VLLM_SECRET"},
        {"secret": SECRET, "secret_file": str(path)},
        {"secret_env": "DXL_TEST_VLLM_SECRET", "secret_file": str(path)},
    ):
        with pytest.raises(ValueError, match="at most one of") as err:
            DxlConnectorConfig.from_extra(extra)
        assert SECRET not in str(err.value)


def test_a_literal_secret_works_with_a_warning_that_never_shows_it(caplog) -> None:
    with caplog.at_level(logging.DEBUG):
        cfg = DxlConnectorConfig.from_extra({"secret": SECRET})
        assert cfg.engine_options(0)[dxl.config.OPT_AUTH_TOKEN] == SECRET
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "secret_env" in warning.getMessage() and "secret_file" in warning.getMessage()
    _no_secret_anywhere(cfg, caplog)
    assert SECRET not in repr(DxlConnectorConfig(secret=SECRET))


def test_digests_are_exact_and_refuse_what_is_not_token_ids() -> None:
    assert prompt_digest(A, 10, BS) == prompt_digest(list(A), 10, BS)
    assert len(prompt_digest(A, 10, BS) or "") == 64
    bad_prompts: list[Any] = [None, ["a"] * 10, [-1] * 10, [1 << 64] * 10, [math.pi] * 10]
    for bad in bad_prompts:
        assert prompt_digest(bad, 10, BS) is None
    assert prompt_digest(A, 11, BS) is None  # more tokens than the prompt has
