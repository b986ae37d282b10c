"""Small stand-ins for what vLLM hands the dxl connector, so its logic is tested without vLLM:
KV tensors in vLLM's per-layer layouts (numpy-backed, with torch's ``shape``/``stride()``/
``data_ptr()``/``element_size()``/``device``) and requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

# vLLM's KVCacheLayout: the physical order of the logical axes [L, B, H, N, C]
LAYOUTS = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
}


class FakeTensor:
    """A numpy view that answers like a torch tensor (strides in elements)."""

    def __init__(self, array: np.ndarray, device: str = "cpu") -> None:
        self.array = array
        self.shape = tuple(array.shape)
        self.device = SimpleNamespace(type=device)

    def stride(self) -> tuple[int, ...]:
        return tuple(s // self.array.itemsize for s in self.array.strides)

    def data_ptr(self) -> int:
        return int(self.array.ctypes.data)

    def element_size(self) -> int:
        return int(self.array.itemsize)


@dataclass
class FakeKV:
    """vLLM's KV caches: one backing buffer, one [B, H, N, C] view per layer, in ``layout``."""

    layers: int = 3
    blocks: int = 16
    heads: int = 2
    block_size: int = 4
    head_dim: int = 8  # head_size + head_size_v
    layout: str = "LBHNC"
    seed: int | None = None
    tensors: dict[str, FakeTensor] = field(init=False)
    views: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        logical = (self.layers, self.blocks, self.heads, self.block_size, self.head_dim)
        order = LAYOUTS[self.layout]
        physical = tuple(logical[i] for i in order)
        buf = np.zeros(physical, dtype=np.float16)
        if self.seed is not None:
            rng = np.random.default_rng(self.seed)
            buf[...] = rng.standard_normal(physical).astype(np.float16)
        self.backing = buf
        inverse = tuple(order.index(i) for i in range(5))
        full = buf.transpose(inverse)  # logical [L, B, H, N, C] over the physical buffer
        self.views = [full[layer] for layer in range(self.layers)]
        self.tensors = {f"model.layers.{i}.attn": FakeTensor(v) for i, v in enumerate(self.views)}

    def block(self, layer: int, block: int) -> np.ndarray:
        return np.array(self.views[layer][block])


@dataclass
class Status:
    name: str


@dataclass
class Req:
    """The part of vllm.v1.request.Request the connector reads."""

    request_id: str
    num_prompt_tokens: int
    kv_transfer_params: dict[str, Any] | None = None
    num_computed_tokens: int = 0
    status: Status = field(default_factory=lambda: Status("RUNNING"))
    prompt_token_ids: list[int] | None = None  # default: a fixed prompt of that length

    def __post_init__(self) -> None:
        if self.prompt_token_ids is None:
            self.prompt_token_ids = prompt_of(self.num_prompt_tokens)


def prompt_of(n: int, seed: int = 0) -> list[int]:
    """A prompt of ``n`` token ids (the same for the same seed, on prefill and decode alike)."""
    return [(1000 + 7919 * (i + seed * 104729)) % 151_000 for i in range(n)]
