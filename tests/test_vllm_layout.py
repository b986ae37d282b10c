"""dxl.integrations.vllm without vLLM: the KV layouts it registers or refuses, its settings,
and that importing it (or dxl) imports no vLLM."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from vllm_fakes import FakeKV, FakeTensor

from dxl.integrations.vllm import DxlConnectorConfig, LayoutError, kv_layout


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
def test_layer_major_layouts_register_one_tensor_per_layer(layout: str) -> None:
    kv = FakeKV(layout=layout)
    got = kv_layout(kv.tensors, kv.blocks)
    page = kv.heads * kv.block_size * kv.head_dim * 2  # float16
    assert got.block_bytes == page
    assert got.tensors_per_layer == 1
    assert got.num_blocks == kv.blocks
    assert got.layer_names == tuple(kv.tensors)
    base = kv.backing.ctypes.data
    assert got.addrs == tuple(base + i * kv.blocks * page for i in range(kv.layers))


def test_lbnhc_strides_are_the_ones_vllm_documents() -> None:
    kv = FakeKV(layout="LBNHC", heads=2, block_size=16, head_dim=128)
    assert next(iter(kv.tensors.values())).stride() == (4096, 128, 256, 1)


def test_a_block_in_several_spans_is_refused_with_the_layer_name() -> None:
    kv = FakeKV(layout="LHBNC")
    with pytest.raises(LayoutError, match=r"layer 'model.layers.0.attn'.*not one contiguous span"):
        kv_layout(kv.tensors, kv.blocks)


def test_layers_interleaved_per_block_are_refused() -> None:
    kv = FakeKV(layout="BLHNC")
    with pytest.raises(LayoutError, match=r"layer 'model.layers.0.attn'.*back to back"):
        kv_layout(kv.tensors, kv.blocks)


def test_memory_other_than_cpu_and_cuda_is_refused() -> None:
    kv = FakeKV()
    name = next(iter(kv.tensors))
    kv.tensors[name] = FakeTensor(kv.views[0], device="meta")
    with pytest.raises(LayoutError, match=rf"layer '{name}' is on meta: .*CPU.*CUDA"):
        kv_layout(kv.tensors, kv.blocks)


def test_other_ranks_are_refused() -> None:
    flat = FakeTensor(np.zeros(1024, dtype=np.int8))
    with pytest.raises(LayoutError, match=r"layer 'mamba' has shape \[1024\]"):
        kv_layout({"mamba": flat}, 16)


def test_k_and_v_apart_are_two_tensors_per_layer() -> None:
    buf = np.zeros((2, 2, 16, 4, 2, 8), dtype=np.float16)  # [L, 2, B, N, H, D]
    tensors = {f"l{i}": FakeTensor(buf[i]) for i in range(2)}
    got = kv_layout(tensors, 16)
    assert got.tensors_per_layer == 2
    assert got.block_bytes == 4 * 2 * 8 * 2
    assert len(got.addrs) == 4


def test_kernel_blocks_make_one_scheduler_block() -> None:
    kv = FakeKV(blocks=32)  # the attention kernel splits each of 16 blocks in two
    got = kv_layout(kv.tensors, 16)
    assert got.num_blocks == 16
    assert got.block_bytes == 2 * kv.heads * kv.block_size * kv.head_dim * 2
    with pytest.raises(LayoutError, match="not a multiple of the scheduler's 12"):
        kv_layout(kv.tensors, 12)


def test_shared_layers_are_registered_once_and_overlaps_refused() -> None:
    kv = FakeKV()
    names = list(kv.tensors)
    shared = dict(kv.tensors)
    shared["model.layers.9.attn"] = kv.tensors[names[0]]  # vLLM's cross-layer KV sharing
    assert kv_layout(shared, kv.blocks).layer_names == tuple(names)
    overlap = {"a": FakeTensor(kv.views[0][:8]), "b": FakeTensor(kv.views[0][4:12])}
    with pytest.raises(LayoutError, match="layers 'a' and 'b' overlap"):
        kv_layout(overlap, 8)


def test_mixed_block_sizes_are_refused() -> None:
    a, b = FakeKV(head_dim=8), FakeKV(head_dim=16)
    mixed = {"a": a.tensors[next(iter(a.tensors))], "b": b.tensors[next(iter(b.tensors))]}
    with pytest.raises(LayoutError, match="one block size for every layer"):
        kv_layout(mixed, a.blocks)


def test_config_defaults_work_on_one_host() -> None:
    cfg = DxlConnectorConfig.from_extra(None)
    assert cfg.listen == "127.0.0.1:0"
    assert cfg.lease_s == 30.0
    assert cfg.engine_options(0)["llm.listenIpInfo"] == "127.0.0.1:0"


def test_config_keys_and_ranks() -> None:
    cfg = DxlConnectorConfig.from_extra(
        {"dxl": {"listen": "10.0.0.5:27000", "secret": "s3cret", "lease_s": 5, "transport": "tcp"}}
    )
    opts = cfg.engine_options(3)
    assert opts["llm.listenIpInfo"] == "10.0.0.5:27003"
    assert opts["dxl.AuthToken"] == "s3cret"
    assert opts["dxl.Transport"] == "tcp"
    assert "dxl.AllowRemoteListen" not in opts  # the engine refuses a remote listen sans secret


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"lisen": "1.2.3.4:1"}, "unknown kv_connector_extra_config key"),
        ({"listen": "nohost"}, "listen must be 'host:port'"),
        ({"lease_s": 0}, "lease_s"),
        ({"transport": "rdma"}, "transport"),
    ],
)
def test_bad_config_is_refused(extra: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DxlConnectorConfig.from_extra(extra)


@pytest.mark.multiproc
def test_importing_dxl_and_the_connector_core_imports_no_vllm() -> None:
    code = (
        "import sys, dxl, dxl.integrations.vllm, dxl.integrations.vllm.worker\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
