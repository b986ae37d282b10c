"""Local copies within this process: ``copy_cache``, ``copy_blocks``, ``swap_blocks`` (spec
6.13-6.15).

Each operation is planned here with numpy into coalesced :class:`~dxl.memory.plan.Pieces` and
then moved by one native call, :func:`run_pieces`. The engine checks the arguments' types
(``dxl._validate``) and resolves each ``Cache`` to its :class:`~dxl.memory.layout.Layout` (and
answers ``LLM_KV_CACHE_NOT_EXIST`` for unknown ones); these
functions check the rules that depend on layouts and indices, in the reference's order, and
raise before anything is copied, so a refused call leaves memory untouched.

dxl rules beyond the reference:

* **No order-dependent copies.** A plan whose destination ranges overlap one another, or
  overlap a source range, is refused with ``LLM_PARAM_INVALID``: the native copy splits work
  across threads, so the result would depend on timing. For ``copy_blocks`` this means a
  destination block may not be a source of another entry, nor appear twice; ``swap_blocks``
  may not name a destination block twice, nor swap within one cache in a way that reads a block
  it also writes. A piece whose source *is* its destination (``{3: [3]}``, or copying a batch
  onto itself) is a no-op and is dropped.
* **Every placement pair.** ``swap_blocks`` is HOST<->DEVICE in the reference; dxl's stance 2
  allows every pair, HOST<->HOST included, so no direction rule is checked here (the engine
  checks placements it cannot serve, such as DEVICE without CUDA).
"""

from __future__ import annotations

import numpy as np

from .. import _ffi
from ..errors import param_invalid
from .layout import Layout
from .plan import U64, Pieces, block_pieces, coalesce

__all__ = [
    "plan_copy_blocks",
    "plan_copy_cache",
    "plan_swap_blocks",
    "run_pieces",
]

# -- planning -----------------------------------------------------------------------------------


def plan_copy_cache(
    dst: Layout,
    src: Layout,
    dst_batch_index: int = 0,
    src_batch_index: int = 0,
    offset: int = 0,
    size: int = -1,
) -> Pieces:
    """Plan ``copy_cache``: per tensor, ``size`` bytes from ``src_batch_index * S_src + offset``
    of the source tensor to ``dst_batch_index * S_dst + offset`` of the destination tensor,
    where ``S`` is each cache's batch stride (``tensor_size // units``).

    Args:
        dst, src: Layouts of two contiguous caches (they may be the same cache).
        dst_batch_index, src_batch_index: Batches, each within its cache.
        offset: Byte offset inside the batch, the same on both sides; < both strides.
        size: Bytes per tensor, or -1 for ``S_src - offset``; must fit in both strides.

    Raises:
        LLMException: ``LLM_PARAM_INVALID`` for a blocks cache, different ``num_tensors``, a
            batch index out of range, ``offset`` >= a stride, ``size`` past either stride, or
            overlapping ranges.
    """
    op = "copy_cache"
    if dst.blocks or src.blocks:
        side = "dst" if dst.blocks else "src"
        raise param_invalid(
            op,
            f"{side} is a blocks cache; copy_cache copies between "
            "contiguous caches (use copy_blocks for blocks)",
        )
    _same_num_tensors(op, "dst", dst, "src", src)
    _index_in_range(op, "dst_batch_index", dst_batch_index, dst.units)
    _index_in_range(op, "src_batch_index", src_batch_index, src.units)
    s_dst, s_src = dst.unit_bytes, src.unit_bytes
    if offset >= s_src or offset >= s_dst:
        raise param_invalid(
            op,
            f"offset must be < the batch stride of both caches (src "
            f"{s_src}, dst {s_dst} bytes), got {offset}",
        )
    nbytes = s_src - offset if size == -1 else size
    for side, stride in (("src", s_src), ("dst", s_dst)):
        if offset + nbytes > stride:
            raise param_invalid(
                op,
                f"offset {offset} + size {nbytes} exceeds the {side} batch "
                f"stride of {stride} bytes",
            )
    d = dst.addrs.astype(U64) + U64(dst_batch_index * s_dst + offset)
    s = src.addrs.astype(U64) + U64(src_batch_index * s_src + offset)
    return _finish(op, coalesce(d, s, np.full(d.size, nbytes, dtype=U64)))


def plan_copy_blocks(cache: Layout, copy_block_info: dict[int, list[int]]) -> Pieces:
    """Plan ``copy_blocks``: block ``src`` to every block in ``copy_block_info[src]``, in every
    tensor of one blocks cache.

    Args:
        cache: Layout of a blocks cache.
        copy_block_info: Already type-checked (``dxl._validate.check_copy_block_info``).

    Raises:
        LLMException: ``LLM_PARAM_INVALID`` for a contiguous cache, an index outside
            ``[0, num_blocks)``, a destination that is also another entry's source or appears
            twice.
    """
    op = "copy_blocks"
    if not cache.blocks:
        raise param_invalid(op, "cache must be a blocks cache")
    counts = [len(v) for v in copy_block_info.values()]
    srcs = _indices(op, "copy_block_info keys", list(copy_block_info), cache.units)
    srcs = np.repeat(srcs, counts)
    flat = [d for v in copy_block_info.values() for d in v]
    dsts = _indices(op, "copy_block_info destinations", flat, cache.units)
    moving = dsts != srcs  # {b: [b]} copies a block onto itself: nothing to do
    srcs, dsts = srcs[moving], dsts[moving]
    uniq, seen = np.unique(dsts, return_counts=True)
    if (seen > 1).any():
        raise param_invalid(
            op,
            f"destination block {int(uniq[seen > 1][0])} appears more than "
            "once; each block may be written by one copy only",
        )
    both = np.intersect1d(dsts, srcs)
    if both.size:
        raise param_invalid(
            op,
            f"block {int(both[0])} is both a destination and the source of "
            "another copy; the result would depend on copy order",
        )
    return _finish(op, block_pieces(cache.addrs, cache.addrs, dsts, srcs, cache.unit_bytes))


def plan_swap_blocks(src: Layout, dst: Layout, src_to_dst: dict[int, int]) -> Pieces:
    """Plan ``swap_blocks``: block ``s`` of ``src`` to block ``src_to_dst[s]`` of ``dst``, in
    every tensor.

    Args:
        src, dst: Layouts of two blocks caches with equal block size and tensor count (any
            placement pair, see the module notes).
        src_to_dst: Already type-checked (``dxl._validate.check_src_to_dst``).

    Raises:
        LLMException: ``LLM_PARAM_INVALID`` for a contiguous cache, different block sizes or
            tensor counts, an index out of range, a destination block named twice, or ranges
            that overlap (a swap within one cache that reads a block it writes).
    """
    op = "swap_blocks"
    for side, layout in (("src_cache", src), ("dst_cache", dst)):
        if not layout.blocks:
            raise param_invalid(op, f"{side} must be a blocks cache")
    if src.unit_bytes != dst.unit_bytes:
        raise param_invalid(
            op,
            f"block sizes differ: src_cache {src.unit_bytes} bytes, "
            f"dst_cache {dst.unit_bytes} bytes",
        )
    _same_num_tensors(op, "src_cache", src, "dst_cache", dst)
    s = _indices(op, "src_to_dst keys", list(src_to_dst), src.units)
    d = _indices(op, "src_to_dst values", list(src_to_dst.values()), dst.units)
    uniq, seen = np.unique(d, return_counts=True)
    if (seen > 1).any():
        raise param_invalid(
            op, f"destination block {int(uniq[seen > 1][0])} appears more than once in src_to_dst"
        )
    return _finish(op, block_pieces(dst.addrs, src.addrs, d, s, src.unit_bytes))


# -- execution ----------------------------------------------------------------------------------


def run_pieces(pieces: Pieces, threads: int) -> int:
    """Copy every piece with one native call (``dxl_copy_pieces``; cffi releases the GIL).

    The caller guarantees every range is mapped for the whole call: it holds the caches that
    own them (a bad address crashes, as memcpy does).

    Args:
        pieces: A plan from this module (non-overlapping).
        threads: Most threads to split the copy across (the native layer caps it at 16).

    Returns:
        Bytes copied.

    Raises:
        NativeError: The native layer refused the arrays (``DXL_E_INVAL``: a range wraps).
    """
    n = pieces.count
    if n == 0:
        return 0
    dst = np.ascontiguousarray(pieces.dst, dtype=U64)
    src = np.ascontiguousarray(pieces.src, dtype=U64)
    length = np.ascontiguousarray(pieces.length, dtype=U64)
    _ffi.check(
        _ffi.lib.dxl_copy_pieces(
            _ffi.as_u64_ptr(dst), _ffi.as_u64_ptr(src), _ffi.as_u64_ptr(length), n, threads
        ),
        "local copy",
    )
    return int(length.sum(dtype=U64))


# -- helpers ------------------------------------------------------------------------------------


def _same_num_tensors(op: str, a_name: str, a: Layout, b_name: str, b: Layout) -> None:
    if a.num_tensors != b.num_tensors:
        raise param_invalid(
            op,
            f"{a_name} and {b_name} must have the same num_tensors, got "
            f"{a.num_tensors} and {b.num_tensors}",
        )


def _index_in_range(op: str, name: str, index: int, units: int) -> None:
    if not 0 <= index < units:
        raise param_invalid(op, f"{name} must lie in [0, {units}), got {index}")


def _indices(op: str, name: str, values: list[int], units: int) -> np.ndarray:
    """Block indices as int64, each checked to lie in ``[0, units)``."""
    if not values:
        return np.zeros(0, dtype=np.int64)
    lo, hi = min(values), max(values)
    if lo < 0 or hi >= units:
        bad = lo if lo < 0 else hi
        raise param_invalid(op, f"{name} must lie in [0, {units}), got {bad}")
    return np.asarray(values, dtype=np.int64)


def _finish(op: str, pieces: Pieces) -> Pieces:
    """Drop pieces that copy a range onto itself, then refuse any remaining overlap."""
    keep = pieces.dst != pieces.src
    if not keep.all():
        pieces = Pieces(pieces.dst[keep], pieces.src[keep], pieces.length[keep])
    if pieces.count:
        _check_disjoint(op, pieces)
    return pieces


def _check_disjoint(op: str, pieces: Pieces) -> None:
    """Destinations must not overlap each other nor any source (sources may share bytes)."""
    order = np.argsort(pieces.dst, kind="stable")
    d_start = pieces.dst[order]
    d_end = d_start + pieces.length[order]
    # Sorted by start, some pair overlaps iff some neighbouring pair does.
    if (d_start[1:] < d_end[:-1]).any():
        raise param_invalid(
            op,
            "destination ranges overlap (the same bytes would be written "
            "twice); the result would depend on copy order",
        )
    order = np.argsort(pieces.src, kind="stable")
    s_start = pieces.src[order]
    s_end = np.maximum.accumulate(s_start + pieces.length[order])
    # The source union as disjoint runs: a run starts where a piece begins past all earlier ends.
    first = np.concatenate(([True], s_start[1:] > s_end[:-1]))
    run_start = s_start[first]
    run_end = s_end[np.concatenate((np.flatnonzero(first)[1:] - 1, [s_end.size - 1]))]
    # The last run that starts before a destination ends is the only one that can overlap it.
    k = np.searchsorted(run_start, d_end, side="left") - 1
    hit = (k >= 0) & (run_end[np.maximum(k, 0)] > d_start)
    if hit.any():
        raise param_invalid(
            op,
            "a destination range overlaps a source range (a block or batch "
            "is both read and written); the result would depend on copy "
            "order",
        )
