"""Verifiable paged-KV buffers for tests, examples and benchmarks.

``KVBuffers`` allocates one numpy array per tensor (as a serving framework does: K and V of
every layer, each its own allocation) and fills it with a pattern unique per 8-byte word, so
that any copied block can be checked against the block it should have come from without
access to the source process.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Sequence

import numpy as np

from .types import CacheDesc, DataType, Placement

_WORD = 8
Indices = Sequence[int] | np.ndarray  # tensor or block indices: a list, a range, an array


def _tensor_salt(seed: int, tensor: int) -> np.uint64:
    return np.uint64(((seed & 0xFFFF) << 48) | ((tensor & 0xFFFF) << 32))


_HUGE = 2 << 20


def anonymous_words(words: int, offset_bytes: int = 0) -> np.ndarray:
    """``words`` uint64 words on a private anonymous mapping of their own, starting
    ``offset_bytes`` (a multiple of 8) into it: what a framework's large tensors get from its
    allocator, never the ``brk`` heap (which a small or reused ``np.empty`` may come from, and
    which ``dxl.ShareRegistered`` refuses). Zero-filled; unmapped when the array is freed."""
    nbytes = words * _WORD
    region = mmap.mmap(
        -1, max(nbytes + offset_bytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    )
    return np.frombuffer(memoryview(region)[offset_bytes : offset_bytes + nbytes], np.uint64)


def _huge_page_words(words: int) -> np.ndarray:
    """Anonymous memory advised for transparent huge pages, 2 MiB aligned (what a framework
    gets from a THP-enabled allocator, e.g. PyTorch with THP_MEM_ALLOC_ENABLE=1)."""
    nbytes = words * _WORD
    # private anonymous memory: shared (the default for fd -1) follows shmem_enabled, not THP
    region = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(region)) % _HUGE
    view = memoryview(region)[offset : offset + nbytes]
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE, offset - offset % mmap.PAGESIZE, nbytes)
    return np.frombuffer(view, dtype=np.uint64)


class KVBuffers:
    """``num_tensors`` host tensors of ``num_blocks`` blocks of ``block_bytes`` each.

    Args:
        num_tensors: tensors (2 per layer for K and V).
        num_blocks: blocks per tensor.
        block_bytes: bytes per block, a multiple of 8.
        seed: pattern seed (0..65535); ``fill=False`` leaves the memory zeroed.
    """

    def __init__(
        self,
        num_tensors: int,
        num_blocks: int,
        block_bytes: int,
        seed: int = 0,
        fill: bool = True,
        huge_pages: bool = False,
    ) -> None:
        if block_bytes % _WORD:
            raise ValueError(f"block_bytes must be a multiple of {_WORD}, got {block_bytes}")
        self.num_tensors = num_tensors
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.seed = seed
        self.filled = fill
        words = num_blocks * block_bytes // _WORD
        self.words: list[np.ndarray] = []
        for t in range(num_tensors):
            w = _huge_page_words(words) if huge_pages else anonymous_words(words)
            if fill:
                w[:] = np.arange(words, dtype=np.uint64)
                w ^= _tensor_salt(seed, t)
            else:  # touch every page now, as a framework's initialised KV cache would be
                w.fill(0)
            self.words.append(w)

    @classmethod
    def over(
        cls, addrs: list[int], num_blocks: int, block_bytes: int, seed: int = 0, fill: bool = True
    ) -> KVBuffers:
        """View memory someone else owns (e.g. ``Cache.tensor_addrs`` of an allocated cache)
        as KV buffers, writing the pattern into it when ``fill``."""
        self = cls(0, num_blocks, block_bytes, seed, fill=False)
        words = num_blocks * block_bytes // _WORD
        for t, addr in enumerate(addrs):
            w = np.ctypeslib.as_array((ctypes.c_uint64 * words).from_address(addr))
            if fill:
                w[:] = np.arange(words, dtype=np.uint64) ^ _tensor_salt(seed, t)
            self.words.append(w)
        self.num_tensors = len(addrs)
        self.filled = fill
        return self

    @property
    def addrs(self) -> list[int]:
        return [int(w.ctypes.data) for w in self.words]

    @property
    def nbytes(self) -> int:
        return self.num_tensors * self.num_blocks * self.block_bytes

    def desc(self, data_type: DataType = DataType.DT_FLOAT16) -> CacheDesc:
        """A blocks CacheDesc for this layout: shape ``(num_blocks, elements per block)``."""
        itemsize = data_type.itemsize
        return CacheDesc(
            num_tensors=self.num_tensors,
            shape=[self.num_blocks, self.block_bytes // itemsize],
            data_type=data_type,
            placement=Placement.HOST,
        )

    def blocks(self, tensor: int) -> np.ndarray:
        """Tensor ``tensor`` as a (num_blocks, words per block) uint64 view."""
        return self.words[tensor].reshape(self.num_blocks, self.block_bytes // _WORD)

    def matches(
        self,
        tensors: Indices,
        dst_blocks: Indices,
        src_seed: int,
        src_tensors: Indices,
        src_blocks: Indices,
    ) -> bool:
        """True if ``dst_blocks`` of each tensor hold the pattern of ``src_blocks`` of the
        matching source tensor (``src_seed`` names the source's pattern)."""
        wpb = self.block_bytes // _WORD
        src = np.asarray(src_blocks, dtype=np.uint64)
        dst = np.asarray(dst_blocks, dtype=np.int64)
        offsets = src[:, None] * np.uint64(wpb) + np.arange(wpb, dtype=np.uint64)[None, :]
        for t, st in zip(tensors, src_tensors, strict=True):
            expected = offsets ^ _tensor_salt(src_seed, int(st))
            if not np.array_equal(self.blocks(int(t))[dst], expected):
                return False
        return True

    def untouched(self, tensors: Indices, blocks: Indices) -> bool:
        """True if the given blocks still hold this buffer's own pattern (or zeros if unfilled)."""
        blocks = np.asarray(blocks, dtype=np.int64)
        if not blocks.size:
            return True
        if not self.filled:
            return all(not self.blocks(int(t))[blocks].any() for t in tensors)
        return self.matches(tensors, blocks, self.seed, tensors, blocks)
