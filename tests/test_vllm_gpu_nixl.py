"""The dxl connector's worker side moving a request's KV over the nixl transport between two
processes, with the KV caches in vLLM 0.33's layout (torch views of one int8 buffer, LBNHC:
FlashAttention's NHD): on a CUDA device (``cuda``: registered as ``Placement.DEVICE``, the
transport forced to nixl by ``auto``), and in host memory (``cpu``: the same flow with
``transport=nixl``, which runs wherever nixl is installed). Every byte of every layer's blocks
is compared with what the prefill holds; blocks the request does not use stay untouched.

Run with ``.venv-nixl`` (torch and nixl): ``python -m pytest -q tests/test_vllm_gpu_nixl.py``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from math import prod
from typing import Any

import pytest
from vllm_fakes import Req, Status
from waiting import wait_until

from dxl.integrations.vllm.config import DxlConnectorConfig
from dxl.integrations.vllm.scheduler import SchedulerSide
from dxl.integrations.vllm.worker import TransferResults, WorkerSide
from dxl.transport.nixl import nixl_version

torch = pytest.importorskip("torch", reason="torch is not installed (.venv-nixl has it)")

pytestmark = [
    pytest.mark.nixl,
    pytest.mark.multiproc,
    pytest.mark.skipif(nixl_version() is None, reason="nixl is not installed (make test-nixl)"),
]

LAYERS, BLOCKS, HEADS, BS, HEAD = 3, 16, 2, 4, 16  # BS: tokens per block; HEAD: K+V elements
LBNHC = (0, 1, 3, 2, 4)  # physical order of [L, B, H, N, C]
PREFILL_SEED, PROMPT = 5, 10
SRC, DST = [4, 5, 6], [10, 11, 12]
DEADLINE_S = 120.0
CTX = mp.get_context("spawn")


def vllm_kv(device: str, seed: int | None) -> tuple[dict[str, Any], list[Any]]:
    """vLLM 0.33's KV caches on ``device`` (``create_kv_cache_views``: one int8 buffer, a
    float16 ``[B, H, N, C]`` view per layer, LBNHC), filled with bytes of ``seed`` (None:
    zeros): (the views vLLM registers, each layer's int8 view to compare bytes)."""
    itemsize = 2
    logical = (LAYERS, BLOCKS, HEADS, BS, HEAD * itemsize)  # C in bytes
    raw = torch.zeros(prod(logical), dtype=torch.int8)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        raw = torch.randint(-128, 128, raw.shape, generator=gen, dtype=torch.int8)
    raw = raw.to(device)
    strides = [0] * 5
    step = 1
    for dim in reversed(LBNHC):
        strides[dim] = step
        step *= logical[dim]
    full = torch.as_strided(raw, logical, strides)
    raw_layers = [full[layer] for layer in range(LAYERS)]
    views = {f"model.layers.{i}.attn": v.view(torch.float16) for i, v in enumerate(raw_layers)}
    return views, raw_layers


def _config(device: str) -> DxlConnectorConfig:
    # cuda: auto must pick nixl; both: one host without RDMA, two processes that trust each other
    transport = "auto" if device == "cuda" else "nixl"
    return DxlConnectorConfig(transport=transport, nixl_allow_emulated=True)


def _collect(worker: WorkerSide, what: str) -> TransferResults:
    seen = TransferResults()

    def poll() -> bool:
        r = worker.results()
        for f in ("finished_sending", "finished_recving", "failed_recving", "failed_block_ids"):
            getattr(seen, f).update(getattr(r, f))
        return bool(getattr(seen, what))

    wait_until(poll, DEADLINE_S, what)
    return seen


def prefill_main(conn: Any, device: str) -> None:
    """The prefill: a worker side and its scheduler side, offering request r1 (blocks SRC)."""
    worker = WorkerSide(_config(device))
    try:
        views, _ = vllm_kv(device, PREFILL_SEED)
        handshake = worker.register(views, BLOCKS)
        sched = SchedulerSide(_config(device), BS)
        sched.set_handshake({0: handshake})
        req = Req("r1", PROMPT, {"do_remote_decode": True, "do_remote_prefill": False})
        sched.after_alloc(req, list, 0)
        plan = sched.build_plan({"r1": PROMPT}, (), {"r1": SRC}.__getitem__)
        req.num_computed_tokens += PROMPT
        worker.start(plan)
        worker.after_forward(plan)  # the step's offer, after the forward wrote the KV
        req.status = Status("FINISHED_LENGTH_CAPPED")
        delay, params = sched.request_finished(req, SRC)
        conn.send({"delay": delay, "params": params, "layout": str(worker.layout)})
        if conn.recv() == "handed":  # the decode loaded it: the scheduler hands the offer over
            worker.start(sched.build_plan({}, (), {"r1": SRC}.__getitem__))
            sent = _collect(worker, "finished_sending").finished_sending
            conn.send({"finished_sending": sorted(sent)})
            conn.recv()
    except BaseException as exc:  # reported to the test, which fails with it
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        worker.shutdown()


class Prefill:
    def __init__(self, device: str) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=prefill_main, args=(child, device), daemon=True)
        self.proc.start()

    def reply(self) -> dict[str, Any]:
        if not self.conn.poll(DEADLINE_S):
            raise AssertionError(f"the prefill gave no answer within {DEADLINE_S} s")
        out: dict[str, Any] = self.conn.recv()
        assert "error" not in out, f"prefill: {out['error']}"
        return out

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # it may have gone already: the join says
            self.conn.send("stop")
        self.proc.join(DEADLINE_S)
        if self.proc.is_alive():
            self.proc.kill()


@pytest.mark.parametrize(
    "device", [pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("cpu")]
)
def test_a_request_moves_between_two_processes_over_nixl(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (torch sees no CUDA device)")
    prefill = Prefill(device)
    decode = WorkerSide(_config(device))
    try:
        views, got = vllm_kv(device, None)
        decode.register(views, BLOCKS)
        assert decode.layout is not None
        assert decode.layout.device == (0 if device == "cuda" else None)
        assert decode.engine._opts.transport == "nixl"
        offered = prefill.reply()
        assert offered["delay"] is True, offered

        sched = SchedulerSide(_config(device), BS)
        req = Req("d1", PROMPT, dict(offered["params"]))
        count, load_async = sched.num_new_matched_tokens(req, 0)
        assert (count, load_async) == (PROMPT, True)
        sched.after_alloc(req, lambda: list(DST), count)
        decode.start(sched.build_plan({}, (), lambda r: []))
        res = _collect(decode, "finished_recving")
        assert res.finished_recving == {"d1"} and not res.failed_recving, res

        if device == "cuda":
            torch.cuda.synchronize()
        _, want = vllm_kv("cpu", PREFILL_SEED)
        for layer in range(LAYERS):
            here = got[layer].cpu()
            for src, dst in zip(SRC, DST, strict=True):
                assert torch.equal(here[dst], want[layer][src]), (layer, src, dst)
            others = [b for b in range(BLOCKS) if b not in DST]
            assert not here[others].any(), f"layer {layer}: blocks outside the request written"

        prefill.conn.send("handed")
        assert prefill.reply()["finished_sending"] == ["r1"]
    finally:
        decode.shutdown()
        prefill.stop()
