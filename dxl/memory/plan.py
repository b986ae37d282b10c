"""Transfer planning: (layout, block ids, tensors) -> arrays of (dst, src, length) pieces.

Pure, numpy-vectorised functions with no Python loop per block or per tensor, so a request
of a 128k-token, 64-layer model plans in well under a millisecond. Runs of pieces that are
contiguous on both sides (consecutive blocks, or adjacent tensors of one allocation) are
coalesced into one piece, which the native layer then moves with as few syscalls as possible.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

U64 = np.uint64
SCRATCH_MIN = 1 << 16  # pieces: below this, fresh arrays are cheap enough


class Scratch:
    """Reusable uint64 arrays for large plans. A fresh 8 MiB array costs a page fault per
    4 KiB when first written, more than the planning arithmetic itself; an engine keeps a few
    and lends them to plans that are big enough (thread-safe: plans run on worker threads)."""

    def __init__(self, keep: int = 6) -> None:
        self._free: list[np.ndarray] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, n: int) -> np.ndarray:
        with self._lock:
            for i, arr in enumerate(self._free):
                if arr.size >= n:
                    return self._free.pop(i)[:n]
        return np.empty(n, dtype=U64)

    def give(self, *arrays: np.ndarray) -> None:
        with self._lock:
            for arr in arrays:
                base = arr if arr.base is None else arr.base
                if len(self._free) < self._keep and isinstance(base, np.ndarray):
                    self._free.append(base)


@dataclass(frozen=True, slots=True)
class Pieces:
    """A transfer plan: piece i copies ``length[i]`` bytes from ``src[i]`` to ``dst[i]``."""

    dst: np.ndarray
    src: np.ndarray
    length: np.ndarray
    scratch: Scratch | None = None  # lent the arrays: give them back with release()

    def release(self) -> None:
        """Return borrowed arrays once the transfer no longer reads them."""
        if self.scratch is not None:
            self.scratch.give(self.dst, self.src, self.length)

    @property
    def count(self) -> int:
        return int(self.length.size)

    @property
    def nbytes(self) -> int:
        return int(self.length.sum(dtype=U64))

    @classmethod
    def empty(cls) -> Pieces:
        z = np.zeros(0, dtype=U64)
        return cls(z, z, z)


def block_pieces(
    dst_bases: np.ndarray,
    src_bases: np.ndarray,
    dst_blocks: np.ndarray,
    src_blocks: np.ndarray,
    block_bytes: int,
    scratch: Scratch | None = None,
) -> Pieces:
    """Plan block i of every selected tensor: ``src_bases[t] + src_blocks[i] * block_bytes`` to
    ``dst_bases[t] + dst_blocks[i] * block_bytes``, tensor-major order, then coalesce.

    Args:
        dst_bases, src_bases: uint64 base address of each selected tensor (same length).
        dst_blocks, src_blocks: block indices (same length, already range-checked).
        block_bytes: bytes per block, equal on both sides.
        scratch: lends the output arrays of large plans (call ``Pieces.release()`` after).
    """
    # Coalesce in block space first (a few thousand ids), then expand per tensor: runs of
    # consecutive block pairs become one piece per tensor without materialising every block.
    starts, counts = _runs(dst_blocks, src_blocks)
    bb = U64(block_bytes)
    lengths = counts.astype(U64) * bb
    dst_off = dst_blocks[starts].astype(U64) * bb
    src_off = src_blocks[starts].astype(U64) * bb
    n = dst_bases.size * starts.size
    if scratch is not None and n >= SCRATCH_MIN:
        dst, src, length = scratch.take(n), scratch.take(n), scratch.take(n)
        np.add(dst_bases.astype(U64)[:, None], dst_off[None, :], out=dst.reshape(-1, starts.size))
        np.add(src_bases.astype(U64)[:, None], src_off[None, :], out=src.reshape(-1, starts.size))
        length.reshape(-1, starts.size)[:] = lengths
        return Pieces(dst, src, length, scratch)
    dst = dst_bases.astype(U64)[:, None] + dst_off[None, :]
    src = src_bases.astype(U64)[:, None] + src_off[None, :]
    pieces = Pieces(dst.ravel(), src.ravel(), np.tile(lengths, dst_bases.size))
    if starts.size == 1:  # whole runs per tensor: adjacent tensors of one allocation merge too
        return coalesce(pieces.dst, pieces.src, pieces.length)
    return pieces


def _runs(dst_blocks: np.ndarray, src_blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of pairs consecutive on both sides."""
    if dst_blocks.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    brk = (np.diff(dst_blocks) != 1) | (np.diff(src_blocks) != 1)
    starts = np.concatenate(([0], np.flatnonzero(brk) + 1))
    counts = np.diff(np.concatenate((starts, [dst_blocks.size])))
    return starts, counts


def offset_pieces(
    dst_bases: np.ndarray,
    src_bases: np.ndarray,
    dst_offsets: np.ndarray,
    src_offsets: np.ndarray,
    length: int,
) -> Pieces:
    """Plan ``length`` bytes from ``src_bases[t] + src_offsets[i]`` to ``dst_bases[t] +
    dst_offsets[i]`` for every tensor t and unit i (tensor-major), then coalesce."""
    dst = (dst_bases.astype(U64)[:, None] + dst_offsets.astype(U64)[None, :]).ravel()
    src = (src_bases.astype(U64)[:, None] + src_offsets.astype(U64)[None, :]).ravel()
    return coalesce(dst, src, np.full(dst.size, U64(length), dtype=U64))


def coalesce(dst: np.ndarray, src: np.ndarray, length: np.ndarray) -> Pieces:
    """Merge each run of pieces that continue one another on both sides into one piece."""
    if dst.size <= 1:
        return Pieces(dst, src, length)
    ends_dst = dst[:-1] + length[:-1]
    ends_src = src[:-1] + length[:-1]
    starts = np.flatnonzero((dst[1:] != ends_dst) | (src[1:] != ends_src)) + 1
    if starts.size == dst.size - 1:  # nothing to merge: skip the reduction
        return Pieces(dst, src, length)
    starts = np.concatenate(([0], starts))
    return Pieces(dst[starts], src[starts], np.add.reduceat(length, starts))
