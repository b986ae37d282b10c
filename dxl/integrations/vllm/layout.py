"""What dxl registers for the KV caches vLLM hands a worker, read from their shapes and strides.

vLLM 0.33 gives one tensor per layer (``create_kv_cache_views``): a 4-D view ``[num_blocks,
num_kv_heads, block_size, head_size + head_size_v]`` of one shared int8 buffer, in a layout
(``KVCacheLayout``) that permutes the strides. dxl moves a block of a layer as one byte span,
so it takes any layout in which **each block of a layer is one contiguous span and a layer's
blocks lie back to back** (``LBHNC``, ``LBNHC``): one registered tensor per layer, at the
layer's address, with the block stride as block size. The inside of a block may be permuted;
prefill and decode must use the same layout (the bytes are copied as they are). A 5-D view
``[2, num_blocks, ...]`` (K and V apart) is two tensors per layer. Anything else is refused
with the layer's name and the reason (:class:`LayoutError`).

Only ``.shape``, ``.stride()``, ``.data_ptr()``, ``.element_size()`` and ``.device`` are read,
so this module needs no torch (tests pass small fakes).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any, Protocol

__all__ = ["KVLayout", "LayoutError", "TensorLike", "kv_layout"]


class TensorLike(Protocol):
    """The part of a ``torch.Tensor`` this module reads."""

    @property
    def shape(self) -> Sequence[int]: ...

    def stride(self) -> Sequence[int]: ...

    def data_ptr(self) -> int: ...

    def element_size(self) -> int: ...

    @property
    def device(self) -> Any: ...


class LayoutError(ValueError):
    """vLLM's KV caches are in a layout dxl cannot move (the message names the layer)."""


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What to register: ``addrs`` (one per tensor, layer by layer), each ``num_blocks`` blocks
    of ``block_bytes``; ``tensors_per_layer`` tensors per layer (1: K and V share a block)."""

    addrs: tuple[int, ...]
    num_blocks: int
    block_bytes: int
    tensors_per_layer: int
    layer_names: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)


def kv_layout(kv_caches: Mapping[str, TensorLike], num_blocks: int) -> KVLayout:
    """The registration of ``kv_caches`` (vLLM's ``register_kv_caches`` argument, in its
    order), for a scheduler of ``num_blocks`` blocks. Layers that share one tensor (vLLM's
    KV sharing) are registered once. Raises :class:`LayoutError`."""
    if not kv_caches:
        raise LayoutError("no KV cache tensors were given")
    if num_blocks <= 0:
        raise LayoutError(f"num_blocks must be positive, got {num_blocks}")
    addrs: list[int] = []
    names: list[str] = []
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    block_bytes = tpl = 0
    for name, tensor in kv_caches.items():
        shape, stride = tuple(int(d) for d in tensor.shape), tuple(int(s) for s in tensor.stride())
        key = (int(tensor.data_ptr()), shape, stride)
        if key in seen:  # the same view under another layer's name: already registered
            continue
        seen[key] = name
        bases, bb = _layer_spans(name, tensor, shape, stride, num_blocks)
        if block_bytes and (bb, len(bases)) != (block_bytes, tpl):
            raise LayoutError(
                f"layer {name!r}: {len(bases)} tensor(s) of {bb}-byte blocks, but layer "
                f"{names[0]!r} has {tpl} of {block_bytes}: dxl registers one block size for "
                "every layer (one KV cache group)"
            )
        block_bytes, tpl = bb, len(bases)
        addrs.extend(bases)
        names.append(name)
    _check_disjoint(addrs, names, tpl, num_blocks * block_bytes)
    return KVLayout(tuple(addrs), num_blocks, block_bytes, tpl, tuple(names))


def _layer_spans(
    name: str, tensor: TensorLike, shape: tuple[int, ...], stride: tuple[int, ...], blocks: int
) -> tuple[list[int], int]:
    """(base address of each tensor of the layer, bytes per block)."""
    device = getattr(tensor.device, "type", str(tensor.device))
    if device != "cpu":
        raise LayoutError(
            f"layer {name!r} is on {device}: dxl moves host (CPU) KV caches; device memory "
            "needs the cuda transport, which this build does not have yet"
        )
    itemsize = int(tensor.element_size())
    base = int(tensor.data_ptr())
    if len(shape) == 4:
        parts = [base]
        block_dims = (shape, stride)
    elif len(shape) == 5 and shape[0] == 2:  # [2, num_blocks, ...]: K and V apart
        parts = [base, base + stride[0] * itemsize]
        block_dims = (shape[1:], stride[1:])
    else:
        raise LayoutError(
            f"layer {name!r} has shape {list(shape)}: dxl takes vLLM's 4-D per-layer views "
            "[num_blocks, num_kv_heads, block_size, head_size] (or [2, num_blocks, ...])"
        )
    bshape, bstride = block_dims
    if any(s < 0 for s in stride) or 0 in shape:
        raise LayoutError(f"layer {name!r}: empty or negative-stride view {list(stride)}")
    inner = sorted(
        ((st, sh) for sh, st in zip(bshape[1:], bstride[1:], strict=True) if sh > 1),
    )
    want = 1
    for st, sh in inner:  # the block's inside must pack densely, in any order
        if st != want:
            raise LayoutError(
                f"layer {name!r}: a block is not one contiguous span (shape {list(shape)}, "
                f"stride {list(stride)}; layout LHBNC or padded?): dxl moves each block of a "
                "layer as one span; use a layer-major layout (LBHNC, LBNHC)"
            )
        want *= sh
    span = prod(bshape[1:])
    if bshape[0] % blocks:
        raise LayoutError(
            f"layer {name!r} has {bshape[0]} blocks, not a multiple of the scheduler's {blocks}"
        )
    ratio = bshape[0] // blocks  # kernel blocks per scheduler block (vLLM splits big blocks)
    if bstride[0] != span:
        raise LayoutError(
            f"layer {name!r}: its blocks are {bstride[0] * itemsize} bytes apart but hold "
            f"{span * itemsize} (shape {list(shape)}, stride {list(stride)}; layers interleave "
            "per block, as in BLHNC): dxl needs a layer's blocks back to back; use LBHNC or LBNHC"
        )
    return parts, span * ratio * itemsize


def _check_disjoint(addrs: list[int], names: list[str], tpl: int, size: int) -> None:
    """Two registered tensors must not overlap (a copy into one would clobber the other)."""
    spans = sorted((a, i) for i, a in enumerate(addrs))
    for (a, i), (b, j) in itertools.pairwise(spans):
        if a + size > b:
            raise LayoutError(
                f"layers {names[i // tpl]!r} and {names[j // tpl]!r} overlap in memory "
                f"({size} bytes from {a:#x} and from {b:#x}): dxl needs each layer's blocks "
                "apart (one KV cache group, no hybrid overlay)"
            )
