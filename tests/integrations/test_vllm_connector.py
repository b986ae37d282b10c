"""DxlConnector inside vLLM 0.33: real prefill and decode ``Scheduler``s, real connector workers
in two processes with CPU KV caches in vLLM's layout, stepped by hand (see vllm_harness).

``make test-vllm`` runs these in their own environment (.venv-vllm, several GB); without vLLM
they are skipped."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm installs it)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import vllm_harness as H
from vllm.v1.request import RequestStatus
from waiting import wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

PROMPT = [3 + i for i in range(40)]  # 3 blocks of 16 (the last one partial)
STEP_DEADLINE_S = 120.0


@pytest.fixture
def pd() -> Iterator[Any]:
    made: list[H.Instance] = []

    def make(
        name: str, layout: str = "LBNHC", policy: str = "fail", seed: int = 0, **extra: Any
    ) -> H.Instance:
        inst = H.Instance(name, H.vllm_config(layout, policy, **extra), seed)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.stop()


def _finished(inst: H.Instance, req_id: str) -> Any:
    out = inst.outputs.get(req_id)
    return out if out is not None and out.finish_reason is not None else None


def _step_until(inst: H.Instance, done: Any, what: str) -> Any:
    """Step ``inst`` until ``done()`` holds (each step is a real engine-core step)."""

    def poll() -> Any:
        inst.step()
        return done()

    return wait_until(poll, STEP_DEADLINE_S, f"{inst.name}: {what}", first_s=0.0, max_s=0.01)


def _prefill(p: H.Instance, req_id: str, prompt: list[int] = PROMPT) -> dict[str, Any]:
    p.scheduler.add_request(H.request(req_id, prompt, prefill=True))
    out = _step_until(p, lambda: _finished(p, req_id), "the prefill to finish")
    assert out.finish_reason is not None and out.kv_transfer_params is not None
    return dict(out.kv_transfer_params)


def _decode(d: H.Instance, req_id: str, params: dict[str, Any], prompt: list[int] = PROMPT):
    """Run a decode request to its end; returns (output, its blocks, tokens per step)."""
    d.scheduler.add_request(H.request(req_id, prompt, params=params))
    blocks: list[int] = []
    scheduled: list[int] = []

    def done() -> Any:
        if not blocks and req_id in d.scheduler.requests:
            blocks.extend(d.block_ids(req_id))
        return _finished(d, req_id)

    def poll() -> Any:
        so = d.step()
        if req_id in so.num_scheduled_tokens:
            scheduled.append(so.num_scheduled_tokens[req_id])
        return done()

    out = wait_until(poll, STEP_DEADLINE_S, f"decode {req_id} to finish", first_s=0.0, max_s=0.01)
    return out, blocks, scheduled


def _same_blocks(p: H.Instance, pblocks: list[int], d: H.Instance, dblocks: list[int]) -> None:
    src, dst = p.worker.blocks(pblocks), d.worker.blocks(dblocks)
    assert set(src) == set(dst) == set(H.LAYERS)
    for layer in H.LAYERS:
        assert torch.equal(src[layer], dst[layer]), f"{layer}: the decode's blocks differ"


def test_vllm_version_is_a_supported_one() -> None:
    import vllm

    from dxl.integrations.vllm.versions import SUPPORTED, check_vllm_version

    print(f"\nvLLM {vllm.__version__} (torch {torch.__version__})")
    assert check_vllm_version(vllm.__version__) in SUPPORTED


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
def test_a_request_moves_from_prefill_to_decode(pd, layout: str) -> None:
    p, d = pd("prefill", layout, seed=1), pd("decode", layout, seed=2)
    assert p.worker.connector_class == "DxlConnector"
    params = _prefill(p, "r1")
    assert params["do_remote_prefill"] is True
    assert "remote_prefill_cached_tokens" in params  # the prefill scheduler's own key: kept
    [ticket] = params["dxl_tickets"]
    pblocks = ticket["block_ids"]
    assert len(pblocks) == 3 and "r1" in p.scheduler.requests  # held for the decode
    out, dblocks, scheduled = _decode(d, "r1", params)
    assert out.finish_reason is not None and out.stop_reason is None
    assert scheduled[0] == 1  # the decode computed only the last prompt token: KV was loaded
    _same_blocks(p, pblocks, d, dblocks[:3])
    _step_until(p, p.empty, "the prefill to free the request's blocks (finished_sending)")
    assert d.empty()


def test_a_local_prefix_hit_loads_only_the_tail(pd) -> None:
    p, d = pd("prefill", seed=1), pd("decode", seed=2)
    params = _prefill(p, "first")
    _decode(d, "first", params)
    other = PROMPT[:32] + [900 + i for i in range(8)]  # shares 2 full blocks
    params = _prefill(p, "second", other)
    [ticket] = params["dxl_tickets"]
    out, dblocks, scheduled = _decode(d, "second", params, other)
    assert out.finish_reason is not None and scheduled[0] == 1
    _same_blocks(p, ticket["block_ids"], d, dblocks[:3])
    _step_until(p, p.empty, "the prefill to end empty")
    assert d.empty()


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_prefill_killed_mid_load(pd, policy: str) -> None:
    p, d = pd("prefill", seed=1), pd("decode", policy=policy, seed=2)
    warm = [1000 + i for i in range(40)]  # not PROMPT: no prefix-cache hit for r1 below
    _decode(d, "warm", _prefill(p, "warm", warm), warm)  # the decode is linked to it now
    params = _prefill(p, "r1")
    p.worker.signal(signal.SIGSTOP)  # it can no longer answer the fetch
    d.scheduler.add_request(H.request("r1", PROMPT, params=params))
    d.step()  # the load starts
    assert d.scheduler.requests["r1"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
    wait_until(lambda: d.worker.call("stats")["fetches"] == 1, 60, "the fetch to be in flight")
    p.worker.kill()
    scheduled: list[int] = []

    def poll() -> Any:
        so = d.step()
        scheduled.append(so.num_scheduled_tokens.get("r1", 0))
        return _finished(d, "r1")

    out = wait_until(poll, STEP_DEADLINE_S, "the decode request to end", first_s=0.0, max_s=0.01)
    if policy == "fail":
        assert out.finish_reason.name == "ERROR"
    else:  # recomputed locally: the whole prompt was scheduled again
        assert out.finish_reason.name == "LENGTH"
        assert sum(scheduled) >= len(PROMPT)
    assert d.empty()


def test_a_decode_that_never_comes_frees_the_prefill_at_lease_end(pd) -> None:
    p = pd("prefill", seed=1, lease_s=1.0)
    _prefill(p, "r1")
    assert "r1" in p.scheduler.requests
    _step_until(p, p.empty, "the lease to expire and the blocks to be freed")


def test_a_prefill_aborted_mid_prompt_hands_nothing_over(pd) -> None:
    p = pd("prefill", seed=1)
    long_prompt = [5 + i for i in range(100)]  # 2 chunks of at most 64 tokens
    p.scheduler.add_request(H.request("r1", long_prompt, prefill=True))
    p.step()
    assert p.scheduler.requests["r1"].num_computed_tokens < len(long_prompt)
    p.scheduler.finish_requests("r1", RequestStatus.FINISHED_ABORTED)
    p.step()
    assert p.empty()
    assert p.worker.call("stats") == {
        "fetches": 0,
        "offers_made": 0,
        "ended_undecided": 0,
        "handed": 0,
        "dropped": 0,
    }


@pytest.mark.parametrize("when", ["before scheduling", "while loading"])
def test_a_decode_abort_frees_both_sides(pd, when: str) -> None:
    p = pd("prefill", seed=1, lease_s=3600.0)  # only the decode's release can free it in time
    d = pd("decode", seed=2)
    params = _prefill(p, "r1")
    d.scheduler.add_request(H.request("r1", PROMPT, params=params))
    if when == "while loading":
        d.step()
    d.scheduler.finish_requests("r1", RequestStatus.FINISHED_ABORTED)
    _step_until(d, d.empty, "the decode to end empty")
    _step_until(p, p.empty, "the prefill to free the request (released, not the lease)")


def test_dxl_logs_go_through_vllms_format_at_dxl_log_level(monkeypatch) -> None:
    """dxl's records reach vLLM's handler format (stream, formatter), at $DXL_LOG_LEVEL."""
    import io
    import logging
    import re

    from dxl.integrations.vllm import connector

    dxl_log = logging.getLogger("dxl")
    saved = (list(dxl_log.handlers), dxl_log.level, dxl_log.propagate)
    try:
        for h in list(dxl_log.handlers):
            dxl_log.removeHandler(h)
        if not logging.getLogger("vllm").handlers:  # as `vllm serve` does in each process
            from vllm.config.logging import LoggingConfig
            from vllm.logger import configure_logging

            configure_logging(LoggingConfig())
        [vllm_handler, *_] = logging.getLogger("vllm").handlers
        stream = io.StringIO()
        monkeypatch.setattr(vllm_handler, "stream", stream)
        monkeypatch.setenv("DXL_LOG_LEVEL", "DEBUG")
        connector.route_dxl_logs()
        connector.route_dxl_logs()  # once per process: no second handler
        assert sum(isinstance(h, connector._VLLMFormatHandler) for h in dxl_log.handlers) == 1
        logging.getLogger("dxl.vllm").debug("dxl: a debug line %d", 7)
        logging.getLogger("dxl.engine").info("dxl: an info line")
        out = stream.getvalue()
        assert re.search(r"DEBUG \d\d-\d\d [\d:]+ \[.*:\d+\] dxl: a debug line 7", out), out
        assert re.search(r"INFO \d\d-\d\d [\d:]+ \[.*:\d+\] dxl: an info line", out), out
    finally:
        for h in list(dxl_log.handlers):
            dxl_log.removeHandler(h)
        for h in saved[0]:
            dxl_log.addHandler(h)
        dxl_log.setLevel(saved[1])
        dxl_log.propagate = saved[2]
