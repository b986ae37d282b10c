"""The dxl connector's GPU KV caches without a GPU: the layouts of vLLM's GPU attention backends,
given as numbers (shape, strides, element size, a device address, a CUDA device), registered or
refused; and the transport CUDA caches force (nixl), refused before anything starts when it
cannot be had. The real thing (CUDA caches moved over nixl between two processes) is in
tests/test_vllm_gpu_nixl.py."""

from __future__ import annotations

import asyncio
import sys
import threading
from dataclasses import dataclass
from math import prod
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from dxl.integrations.vllm import DxlConnectorConfig, LayoutError, kv_layout
from dxl.integrations.vllm.layout import block_spans
from dxl.integrations.vllm.worker import WorkerSide
from dxl.memory.layout import Layout
from dxl.transport import nixl as nixl_mod
from dxl.types import Placement

GPU_BASE = 0x7F3A_0000_0000  # where a CUDA allocation might lie (never dereferenced here)

# vLLM 0.33's KVCacheLayout: the physical order of the logical axes [L, B, H, N, C]
ORDERS = {
    "LBHNC": (0, 1, 2, 3, 4),  # HND (FlashInfer's default, TRT-LLM kernels)
    "LBNHC": (0, 1, 3, 2, 4),  # NHD (vLLM's default: FlashAttention)
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
}


@dataclass
class NumTensor:
    """A tensor given by its numbers only, as torch describes one (strides in elements)."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    itemsize: int
    base: int
    where: str = "cuda"
    index: int | None = 0

    def stride(self) -> tuple[int, ...]:
        return self.strides

    def data_ptr(self) -> int:
        return self.base

    def element_size(self) -> int:
        return self.itemsize

    @property
    def device(self) -> Any:
        return SimpleNamespace(type=self.where, index=self.index)


def vllm033_views(
    layout: str,
    *,
    layers: int = 3,
    blocks: int = 16,
    heads: int = 8,
    block_size: int = 16,
    content: int = 256,  # elements: head_size + head_size_v (MLA: the latent, 1 head)
    itemsize: int = 2,
    kernel_blocks: int = 1,  # kernel blocks per scheduler block
    base: int = GPU_BASE,
    index: int = 0,
) -> dict[str, NumTensor]:
    """vLLM 0.33's per-layer views of one backing buffer (``create_kv_cache_views``: strides
    from ``compute_layout_strides``, then ``.view(dtype)``), at ``base`` on cuda:``index``."""
    kb = blocks * kernel_blocks
    logical = (layers, kb, heads, block_size // kernel_blocks, content * itemsize)  # C in bytes
    order = ORDERS[layout]
    strides = [0] * 5
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= logical[dim]
    views = {}
    for layer in range(layers):
        shape = (*logical[1:4], content)
        stride = (*(s // itemsize for s in strides[1:4]), 1)
        views[f"model.layers.{layer}.attn"] = NumTensor(
            shape, stride, itemsize, base + layer * strides[0], index=index
        )
    return views


def contiguous(shape: tuple[int, ...], order: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Element strides of ``shape`` allocated in the physical dim order ``order`` and viewed back
    (vLLM before 0.33: ``get_kv_cache_stride_order``)."""
    order = order or tuple(range(len(shape)))
    strides = [0] * len(shape)
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= shape[dim]
    return tuple(strides)


# ====================================================================== vLLM 0.33: every backend
@pytest.mark.parametrize(
    ("backend", "layout", "heads", "content"),
    [
        ("flash_attn NHD", "LBNHC", 8, 2 * 128),
        ("flash_attn HND", "LBHNC", 8, 2 * 128),
        ("flashinfer HND", "LBHNC", 4, 2 * 64),
        ("mla", "LBNHC", 1, 512 + 64),  # one head: kv_lora_rank + rope dim, no V
    ],
)
def test_vllm033_gpu_views_register_one_device_tensor_per_layer(
    backend: str, layout: str, heads: int, content: int
) -> None:
    views = vllm033_views(layout, heads=heads, content=content, index=1)
    got = kv_layout(views, 16)
    page = heads * 16 * content * 2
    assert got.device == 1
    assert (got.block_bytes, got.tensors_per_layer, got.num_blocks) == (page, 1, 16)
    assert got.addrs == tuple(GPU_BASE + i * 16 * page for i in range(3))
    assert got.layer_names == tuple(views)


def test_vllm033_kernel_blocks_make_one_scheduler_block_on_the_gpu() -> None:
    views = vllm033_views("LBNHC", kernel_blocks=2)  # FlashAttention splits each block in two
    got = kv_layout(views, 16)
    assert got.block_bytes == 8 * 16 * 256 * 2 and got.num_blocks == 16


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ("BLHNC", r"layer 'model.layers.0.attn'.*back to back"),
        ("LHBNC", r"layer 'model.layers.0.attn'.*not one contiguous span"),
    ],
)
def test_vllm033_gpu_layouts_dxl_cannot_move_are_refused(layout: str, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        kv_layout(vllm033_views(layout), 16)


# ====================================================================== earlier per-backend shapes
@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4), (0, 1, 3, 2, 4)], ids=["NHD", "HND"])
def test_flash_attention_k_and_v_apart_are_two_device_tensors_per_layer(order) -> None:
    shape = (2, 32, 16, 8, 128)  # [2, num_blocks, block_size, num_kv_heads, head_size]
    per_layer = prod(shape) * 2
    views = {
        f"l{i}": NumTensor(shape, contiguous(shape, order), 2, GPU_BASE + i * per_layer)
        for i in range(2)
    }
    got = kv_layout(views, 32)
    block = 16 * 8 * 128 * 2
    assert (got.tensors_per_layer, got.block_bytes, got.device) == (2, block, 0)
    half = 32 * block
    assert got.addrs == (GPU_BASE, GPU_BASE + half, GPU_BASE + 2 * half, GPU_BASE + 3 * half)


@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4), (0, 1, 3, 2, 4)], ids=["NHD", "HND"])
def test_flashinfer_blocks_first_are_one_span_per_block(order) -> None:
    shape = (32, 2, 16, 8, 128)  # [num_blocks, 2, block_size, num_kv_heads, head_size]
    got = kv_layout({"l0": NumTensor(shape, contiguous(shape, order), 2, GPU_BASE)}, 32)
    assert (got.tensors_per_layer, got.block_bytes) == (1, 2 * 16 * 8 * 128 * 2)


def test_mla_three_dims_are_one_span_per_block() -> None:
    shape = (32, 16, 576)  # [num_blocks, block_size, head_size]
    bases, block = block_spans("mla", shape, contiguous(shape), 2, GPU_BASE, 32)
    assert (bases, block) == ([GPU_BASE], 16 * 576 * 2)


def test_flash_attention_with_a_block_in_pieces_is_refused() -> None:
    shape = (2, 32, 16, 8, 128)
    order = (0, 3, 1, 2, 4)  # heads outside the blocks: a block is 8 spans
    with pytest.raises(LayoutError, match=r"layer 'l0': a block is not one contiguous span"):
        block_spans("l0", shape, contiguous(shape, order), 2, GPU_BASE, 32)


@pytest.mark.parametrize("shape", [(32, 4096), (2, 2, 32, 16, 8, 128)])
def test_other_ranks_are_refused_naming_layer_shape_and_what_is_supported(shape) -> None:
    with pytest.raises(LayoutError, match=rf"layer 'x' has shape \[{shape[0]}, .*dxl takes vLLM"):
        block_spans("x", shape, contiguous(shape), 2, GPU_BASE, 32)


# ====================================================================== devices
def test_mixed_cpu_and_gpu_layers_are_refused() -> None:
    views = vllm033_views("LBNHC", layers=2)
    views["model.layers.1.attn"].where = "cpu"
    with pytest.raises(
        LayoutError, match=r"layer 'model.layers.1.attn' is in host memory.*'model.layers.0"
    ):
        kv_layout(views, 16)


def test_layers_on_two_gpus_are_refused() -> None:
    views = vllm033_views("LBNHC", layers=2)
    views["model.layers.1.attn"].index = 1
    with pytest.raises(
        LayoutError, match=r"is in cuda:1, but layer 'model.layers.0.attn' in cuda:0"
    ):
        kv_layout(views, 16)


def test_other_devices_are_refused() -> None:
    views = vllm033_views("LBNHC", layers=1)
    views["model.layers.0.attn"].where = "xpu"
    with pytest.raises(LayoutError, match=r"layer 'model.layers.0.attn' is on xpu"):
        kv_layout(views, 16)


# ====================================================================== the transport CUDA forces
@pytest.fixture
def nixl_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nixl_mod, "nixl_version", lambda: "1.5.1")


@pytest.fixture
def nixl_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nixl_mod, "nixl_version", lambda: None)


@pytest.mark.parametrize("transport", ["auto", "nixl"])
def test_cuda_caches_run_the_engine_on_nixl_with_their_device(nixl_installed, transport) -> None:
    cfg = DxlConnectorConfig(transport=transport, nixl_allow_emulated=True)
    opts = cfg.engine_options(1, device=3)
    assert opts["dxl.Transport"] == "nixl"
    assert opts["ge.exec.deviceId"] == "3"
    assert opts["dxl.NixlAllowEmulated"] == "1"
    host = cfg.engine_options(1)  # host caches keep what was configured
    assert host["dxl.Transport"] == transport and "ge.exec.deviceId" not in host


@pytest.mark.parametrize("transport", ["cma", "tcp"])
def test_cuda_caches_over_a_host_transport_are_refused(nixl_installed, transport) -> None:
    cfg = DxlConnectorConfig(transport=transport)
    with pytest.raises(
        ValueError, match=rf"cuda:0, which only the nixl.*transport is '{transport}'"
    ):
        cfg.engine_options(0, device=0)


def test_cuda_caches_without_nixl_name_the_extra(nixl_missing) -> None:
    with pytest.raises(ValueError, match=r"nixl is not installed: pip install 'dxl\[nixl\]'"):
        DxlConnectorConfig().engine_options(0, device=0)


def test_cuda_caches_cannot_be_shared(nixl_installed) -> None:
    with pytest.raises(ValueError, match="share_registered is for KV caches in host memory"):
        DxlConnectorConfig(share_registered=True).engine_options(0, device=0)


def test_nixl_allow_emulated_is_a_json_boolean() -> None:
    with pytest.raises(ValueError, match="nixl_allow_emulated must be true or false"):
        DxlConnectorConfig.from_extra({"nixl_allow_emulated": "false"})
    assert "dxl.NixlAllowEmulated" not in DxlConnectorConfig().engine_options(0)


@pytest.mark.parametrize(
    ("cfg", "fixture", "match"),
    [
        ({"transport": "tcp"}, "nixl_installed", "only the nixl transport"),
        ({}, "nixl_missing", r"pip install 'dxl\[nixl\]'"),
    ],
)
def test_a_worker_refuses_cuda_caches_it_cannot_move_before_starting_anything(
    request: pytest.FixtureRequest, cfg: dict[str, Any], fixture: str, match: str
) -> None:
    request.getfixturevalue(fixture)
    worker = WorkerSide(DxlConnectorConfig(**cfg))
    with pytest.raises(ValueError, match=match):
        worker.register(vllm033_views("LBNHC"), 16)
    assert worker.layout is None and worker.handshake is None
    with pytest.raises(RuntimeError, match="not registered yet"):
        _ = worker.engine  # no engine was started
    worker.shutdown()  # nothing to stop


class FakeTorch:
    """What the worker side calls of torch for CUDA caches: who set which device, where."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.cuda = SimpleNamespace(set_device=self._set_device)

    def _set_device(self, device: int) -> None:
        self.calls.append((threading.current_thread().name, device))


def test_a_worker_registers_cuda_caches_as_device_memory_on_their_device(
    nixl_installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU needed: nothing reads device memory before a link (the NIXL agent, made by the
    first link, registers it); the registration, the engine's options and the threads that
    will call NIXL are checked here."""
    fake = FakeTorch()
    monkeypatch.setitem(sys.modules, "torch", fake)
    worker = WorkerSide(DxlConnectorConfig(nixl_allow_emulated=True))
    try:
        handshake = worker.register(vllm033_views("LBNHC", index=2), 16)
        cache = worker._cache
        assert cache.cache_desc.placement == Placement.DEVICE
        assert worker.engine._opts.transport == "nixl" and worker.engine._opts.device_id == 2
        assert handshake.num_tensors == 3 and handshake.block_bytes == 8 * 16 * 256 * 2
        assert worker._thread is not None
        loop = worker._thread.loop
        assert fake.calls == [(worker._thread._thread.name, 2)]  # the loop thread
        name = asyncio.run_coroutine_threadsafe(
            asyncio.to_thread(lambda: threading.current_thread().name), loop
        ).result(30)
        assert (name, 2) in fake.calls  # a thread of the loop's executor (to_thread: NIXL's)
    finally:
        worker.shutdown()


class RecordingAgent:
    """A NIXL agent that records the descriptor lists it is asked to prepare."""

    def __init__(self) -> None:
        self.prepped: list[tuple[str, str, list[int]]] = []

    def prep_xfer_dlist(self, who: str, descs: Any, mem: str) -> object:
        self.prepped.append((who, mem, sorted({int(d) for d in descs[:, 2]})))
        return object()


@pytest.mark.parametrize(("mem", "device"), [("VRAM", 5), ("DRAM", 0)])
def test_a_peers_cache_is_prepared_with_the_device_nixl_registered_it_on(mem, device) -> None:
    """NIXL finds a remote descriptor only under the peer's device id (0 for host memory): a
    peer's VRAM is prepared on the device the peer advertised with the cache (wire v5), not on
    this engine's own (3 here: prefill and decode on one host use different GPUs)."""
    host = nixl_mod.NixlHost("dxl-1-a", [GPU_BASE, 0], allow_emulated=True, device_id=3)
    agent = RecordingAgent()
    host._agent = agent  # as if the first link had made it
    transport = nixl_mod.NixlTransport(host, "dxl-2-b", [GPU_BASE, 0], 1000)
    layout = Layout(np.array([GPU_BASE, GPU_BASE + 4096], dtype=np.uint64), 4096, 4, True)
    assert transport._remote_prepped(7, layout, mem, 5) is not None
    assert agent.prepped == [("dxl-2-b", mem, [device])]
