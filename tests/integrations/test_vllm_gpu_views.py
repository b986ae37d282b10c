"""The GPU KV views vLLM itself makes (``create_kv_cache_views``, the function its GPU model
runner allocates with), for FlashAttention (NHD: ``LBNHC``; HND: ``LBHNC``) and MLA, read by the
connector's layout as CUDA caches: the buffer lies in host memory (no GPU here) and each view
answers ``device`` as ``cuda:1``; only shapes, strides and addresses are read."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm installs it)")

import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheTensor,
    MLAAttentionSpec,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from dxl.integrations.vllm import LayoutError, kv_layout

pytestmark = [pytest.mark.vllm]

LAYERS, BLOCKS = 3, 16


class OnCuda:
    """A view of vLLM's that says it is on ``cuda:1`` (its bytes are in host memory)."""

    def __init__(self, view: torch.Tensor) -> None:
        self.view = view
        self.shape = view.shape
        self.device = torch.device("cuda", 1)

    def stride(self) -> Any:
        return self.view.stride()

    def data_ptr(self) -> int:
        return int(self.view.data_ptr())

    def element_size(self) -> int:
        return int(self.view.element_size())


def views(spec: Any, layout: KVCacheLayout) -> tuple[dict[str, OnCuda], torch.Tensor]:
    page = spec.page_size_bytes
    names = [f"model.layers.{i}.attn" for i in range(LAYERS)]
    if layout.is_layer_compact:
        tensor = KVCacheTensor(LAYERS * BLOCKS * page, names, BLOCKS * page, page)
    else:  # block-outermost: a block holds every layer's page
        tensor = KVCacheTensor(LAYERS * BLOCKS * page, names, page, LAYERS * page)
    raw = torch.zeros(LAYERS * BLOCKS * page, dtype=torch.int8)
    made = create_kv_cache_views(raw, spec, BLOCKS, layout, tensor)
    return {n: OnCuda(v) for n, v in zip(names, made, strict=True)}, raw


SPECS = {
    "flash_attn": FullAttentionSpec(
        block_size=16, num_kv_heads=8, head_size=128, dtype=torch.float16
    ),
    "mla": MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("backend", list(SPECS))
@pytest.mark.parametrize("layout", [KVCacheLayout.LBNHC, KVCacheLayout.LBHNC])
def test_vllms_gpu_views_register_as_device_memory(backend: str, layout: KVCacheLayout) -> None:
    spec = SPECS[backend]
    kv, raw = views(spec, layout)
    got = kv_layout(kv, BLOCKS)
    page = spec.page_size_bytes
    assert (got.device, got.block_bytes, got.tensors_per_layer) == (1, page, 1)
    base = raw.data_ptr()
    assert got.addrs == tuple(base + i * BLOCKS * page for i in range(LAYERS))


def test_vllms_block_outermost_gpu_views_are_refused() -> None:
    kv, _ = views(SPECS["flash_attn"], KVCacheLayout.BLHNC)
    with pytest.raises(LayoutError, match=r"layer 'model.layers.0.attn'.*back to back"):
        kv_layout(kv, BLOCKS)
