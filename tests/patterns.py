"""Refilling blocks of ``dxl.testing.KVBuffers`` with another pattern, and finding its words.

A KVBuffers word is ``offset ^ (seed << 48 | tensor << 32)``: its top 16 bits name the seed of
the buffer it was written from. :func:`refill` gives blocks the pattern a buffer of ``seed``
holds there (what a serving framework reusing the blocks for another request would write), so
``buf.matches(tensors, blocks, seed, tensors, blocks)`` holds afterwards; :func:`words_of_seed`
counts words of that pattern anywhere in given blocks, to prove none of it travelled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dxl.testing import KVBuffers

_WORD = 8


def refill(buf: KVBuffers, blocks: Sequence[int], seed: int) -> None:
    """Write the pattern of ``seed`` (1..65535) into ``blocks`` of every tensor of ``buf``."""
    assert 0 < seed < 1 << 16, "seed 0 cannot be told from zeroed memory"
    wpb = buf.block_bytes // _WORD
    idx = np.asarray(blocks, dtype=np.uint64)
    offsets = idx[:, None] * np.uint64(wpb) + np.arange(wpb, dtype=np.uint64)[None, :]
    for t in range(buf.num_tensors):
        salt = np.uint64(((seed & 0xFFFF) << 48) | ((t & 0xFFFF) << 32))
        buf.blocks(t)[np.asarray(blocks, dtype=np.int64)] = offsets ^ salt


def words_of_seed(buf: KVBuffers, blocks: Sequence[int], seed: int) -> int:
    """How many words of ``blocks`` (every tensor) carry the pattern of ``seed``."""
    idx = np.asarray(blocks, dtype=np.int64)
    return sum(
        int(np.count_nonzero((buf.blocks(t)[idx] >> np.uint64(48)) == np.uint64(seed)))
        for t in range(buf.num_tensors)
    )


def layers_landed(
    buf: KVBuffers,
    dst_blocks: Sequence[int],
    src_seed: int,
    src_blocks: Sequence[int],
    own_seed: int | None,
    layers: int,
    tensors_per_layer: int = 2,
) -> tuple[list[int], list[int]]:
    """Split ``layers`` of ``dst_blocks`` into (landed whole from the source, untouched: still
    ``own_seed``'s pattern, or zeros for None); a layer that is neither is returned in neither,
    so ``len(landed) + len(untouched) == layers`` says no layer holds a mix."""
    landed, untouched = [], []
    for layer in range(layers):
        tensors = range(layer * tensors_per_layer, (layer + 1) * tensors_per_layer)
        if buf.matches(tensors, dst_blocks, src_seed, tensors, src_blocks):
            landed.append(layer)
        elif _holds_own(buf, tensors, dst_blocks, own_seed):
            untouched.append(layer)
    return landed, untouched


def _holds_own(buf: KVBuffers, tensors: range, blocks: Sequence[int], seed: int | None) -> bool:
    if seed is None:
        return not any(buf.blocks(t)[list(blocks)].any() for t in tensors)
    return buf.matches(tensors, blocks, seed, tensors, blocks)
