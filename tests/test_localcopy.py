"""Local copies: copy_cache, copy_blocks and swap_blocks planning, rules and byte-exact results."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dxl import _ffi
from dxl._validate import check_copy_block_info, check_copy_cache_args, check_src_to_dst
from dxl.errors import LLMException, LLMStatusCode
from dxl.memory.layout import Layout
from dxl.memory.localcopy import (
    _check_disjoint,
    plan_copy_blocks,
    plan_copy_cache,
    plan_swap_blocks,
    run_pieces,
)
from dxl.memory.plan import Pieces
from dxl.testing import KVBuffers

INVALID = LLMStatusCode.LLM_PARAM_INVALID
U64 = np.uint64


class Contiguous:
    """``num_tensors`` separate uint8 arrays of ``batches`` batches of ``stride`` bytes."""

    def __init__(self, num_tensors: int, batches: int, stride: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.arrays = [
            rng.integers(0, 256, batches * stride, dtype=np.uint8) for _ in range(num_tensors)
        ]
        self.stride = stride
        self.layout = Layout(
            np.asarray([a.ctypes.data for a in self.arrays], dtype=U64),
            batches * stride,
            batches,
            False,
        )

    def batch(self, t: int, b: int) -> np.ndarray:
        return self.arrays[t][b * self.stride : (b + 1) * self.stride]

    def snapshot(self) -> list[np.ndarray]:
        return [a.copy() for a in self.arrays]


def blocks_layout(kv: KVBuffers) -> Layout:
    return Layout(
        np.asarray(kv.addrs, dtype=U64), kv.num_blocks * kv.block_bytes, kv.num_blocks, True
    )


def snapshot(*bufs: KVBuffers | Contiguous) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for b in bufs:
        out += [w.copy() for w in b.words] if isinstance(b, KVBuffers) else b.snapshot()
    return out


@contextmanager
def refused(*bufs: KVBuffers | Contiguous, match: str = "") -> Iterator[None]:
    """The block must raise LLM_PARAM_INVALID (message matching) and leave every byte as it was."""
    before = snapshot(*bufs)
    with pytest.raises(LLMException, match=match) as info:
        yield
    assert info.value.status_code == INVALID
    after = snapshot(*bufs)
    assert all(np.array_equal(x, y) for x, y in zip(before, after, strict=True))


def copy(plan: Callable[..., Pieces], *args: Any, threads: int = 1) -> Pieces:
    """Plan then run, as the engine does; returns the plan."""
    pieces = plan(*args)
    assert run_pieces(pieces, threads) == pieces.nbytes
    return pieces


@contextmanager
def split_threshold(nbytes: int) -> Iterator[None]:
    old = _ffi.lib.dxl_split_threshold(nbytes)
    try:
        yield
    finally:
        _ffi.lib.dxl_split_threshold(old)


# -- copy_cache --------------------------------------------------------------------------------


def test_copy_cache_whole_batch() -> None:
    src, dst = Contiguous(3, 4, 64, seed=1), Contiguous(3, 2, 64, seed=2)
    before = dst.snapshot()
    pieces = copy(plan_copy_cache, dst.layout, src.layout, 1, 3)
    assert pieces.count == 3 and pieces.nbytes == 3 * 64
    for t in range(3):
        assert np.array_equal(dst.batch(t, 1), src.batch(t, 3))
        assert np.array_equal(dst.batch(t, 0), before[t][:64])


def test_copy_cache_offset_and_size() -> None:
    src, dst = Contiguous(2, 2, 64, seed=1), Contiguous(2, 2, 64, seed=2)
    before = dst.snapshot()
    copy(plan_copy_cache, dst.layout, src.layout, 0, 1, 8, 16)
    for t in range(2):
        expect = before[t].copy()
        expect[8:24] = src.batch(t, 1)[8:24]
        assert np.array_equal(dst.arrays[t], expect)


def test_copy_cache_size_minus_one_runs_to_the_end_of_the_src_batch() -> None:
    src, dst = Contiguous(2, 2, 32, seed=1), Contiguous(2, 2, 64, seed=2)  # strides differ
    before = dst.snapshot()
    pieces = copy(plan_copy_cache, dst.layout, src.layout, 1, 0, 8, -1)
    assert pieces.nbytes == 2 * (32 - 8)
    for t in range(2):
        expect = before[t].copy()
        expect[64 + 8 : 64 + 32] = src.batch(t, 0)[8:]
        assert np.array_equal(dst.arrays[t], expect)


def test_copy_cache_onto_itself_is_a_no_op() -> None:
    c = Contiguous(2, 3, 64, seed=1)
    before = c.snapshot()
    pieces = copy(plan_copy_cache, c.layout, c.layout, 2, 2)
    assert pieces.count == 0
    assert all(np.array_equal(x, y) for x, y in zip(before, c.arrays, strict=True))


def test_copy_cache_between_batches_of_one_cache() -> None:
    c = Contiguous(2, 3, 64, seed=1)
    before = c.snapshot()
    copy(plan_copy_cache, c.layout, c.layout, 0, 2)
    for t in range(2):
        assert np.array_equal(c.batch(t, 0), before[t][128:])


def test_copy_cache_coalesces_adjacent_tensors() -> None:
    """Tensors laid end to end in one allocation, one batch each: one piece for all of them."""
    buf_src = np.arange(4 * 256, dtype=np.uint8)
    buf_dst = np.zeros(4 * 256, dtype=np.uint8)
    src = Layout(buf_src.ctypes.data + np.arange(4, dtype=U64) * U64(256), 256, 1, False)
    dst = Layout(buf_dst.ctypes.data + np.arange(4, dtype=U64) * U64(256), 256, 1, False)
    pieces = copy(plan_copy_cache, dst, src)
    assert pieces.count == 1 and pieces.nbytes == buf_src.size
    assert np.array_equal(buf_src, buf_dst)


def test_copy_cache_errors() -> None:
    src, dst = Contiguous(2, 4, 64, seed=1), Contiguous(2, 2, 32, seed=2)
    other = Contiguous(3, 4, 64, seed=3)
    kv = KVBuffers(2, 4, 64)
    cases: list[tuple[tuple[Any, ...], str]] = [
        ((blocks_layout(kv), src.layout), "dst is a blocks cache"),
        ((dst.layout, blocks_layout(kv)), "src is a blocks cache"),
        ((dst.layout, other.layout), "same num_tensors, got 2 and 3"),
        ((dst.layout, src.layout, 2, 0), r"dst_batch_index must lie in \[0, 2\), got 2"),
        ((dst.layout, src.layout, 0, 4), r"src_batch_index must lie in \[0, 4\), got 4"),
        ((dst.layout, src.layout, 0, 0, 32, 1), "offset must be < the batch stride"),
        ((src.layout, dst.layout, 0, 0, 32, 1), "offset must be < the batch stride"),
        ((dst.layout, src.layout, 0, 0, 0, -1), "size 64 exceeds the dst batch stride of 32"),
        ((dst.layout, src.layout, 0, 0, 8, 25), "size 25 exceeds the dst batch stride"),
        ((src.layout, dst.layout, 0, 0, 0, 33), "size 33 exceeds the src batch stride of 32"),
    ]
    for call_args, match in cases:
        with refused(src, dst, other, kv, match="copy_cache failed.*" + match):
            copy(plan_copy_cache, *call_args)


def test_copy_cache_refuses_aliased_overlap() -> None:
    """The same memory registered twice, shifted: source and destination bytes overlap."""
    c = Contiguous(1, 2, 64, seed=1)
    shifted = Layout(c.layout.addrs + U64(8), c.layout.tensor_size, 2, False)
    with refused(c, match="destination range overlaps a source range"):
        copy(plan_copy_cache, shifted, c.layout, 0, 0, 0, 32)


def test_copy_cache_args() -> None:
    check_copy_cache_args(0, 0, 0, -1)
    check_copy_cache_args(2**32 - 1, 1, 2**64 - 1, 2**63 - 1, 2**64 - 1)
    for bad_size in (0, -2):
        with pytest.raises(LLMException, match="size must be -1") as info:
            check_copy_cache_args(0, 0, 0, bad_size)
        assert info.value.status_code == INVALID
    with pytest.raises(TypeError, match="dst_batch_index"):
        check_copy_cache_args("0", 0, 0, -1)
    with pytest.raises(ValueError, match="src_batch_index"):
        check_copy_cache_args(0, -1, 0, -1)
    with pytest.raises(ValueError, match="offset"):
        check_copy_cache_args(0, 0, -1, -1)
    with pytest.raises(ValueError, match="size"):
        check_copy_cache_args(0, 0, 0, 2**63)
    with pytest.raises(TypeError, match="req_id"):
        check_copy_cache_args(0, 0, 0, -1, "r")


# -- copy_blocks -------------------------------------------------------------------------------


def test_copy_blocks() -> None:
    kv = KVBuffers(4, 16, 256, seed=3)
    copy(plan_copy_blocks, blocks_layout(kv), {0: [5, 6], 1: [7], 2: []})
    tensors = list(range(4))
    assert kv.matches(tensors, [5, 6, 7], 3, tensors, [0, 0, 1])
    assert kv.untouched(tensors, [b for b in range(16) if b not in (5, 6, 7)])


def test_copy_blocks_coalesces_runs() -> None:
    kv = KVBuffers(4, 16, 256, seed=3)
    pieces = copy(plan_copy_blocks, blocks_layout(kv), {i: [i + 8] for i in range(4)})
    assert pieces.count == 4 and pieces.nbytes == 4 * 4 * 256  # one piece per tensor
    tensors = list(range(4))
    assert kv.matches(tensors, range(8, 12), 3, tensors, range(4))


def test_copy_blocks_self_copy_and_empty_are_no_ops() -> None:
    kv = KVBuffers(2, 8, 64)
    before = snapshot(kv)
    assert copy(plan_copy_blocks, blocks_layout(kv), {3: [3], 4: []}).count == 0
    assert copy(plan_copy_blocks, blocks_layout(kv), {}).count == 0
    assert all(np.array_equal(x, y) for x, y in zip(before, snapshot(kv), strict=True))


def test_copy_blocks_errors() -> None:
    kv = KVBuffers(2, 8, 64)
    c = Contiguous(2, 8, 64, seed=1)
    layout = blocks_layout(kv)
    cases: list[tuple[Layout, dict[int, list[int]], str]] = [
        (c.layout, {0: [1]}, "cache must be a blocks cache"),
        (layout, {8: [1]}, r"copy_block_info keys must lie in \[0, 8\), got 8"),
        (layout, {-1: [1]}, r"keys must lie in \[0, 8\), got -1"),
        (layout, {0: [1, 2**70]}, r"destinations must lie in \[0, 8\), got 1180"),
        (layout, {0: [1], 2: [1]}, "destination block 1 appears more than once"),
        (layout, {0: [1, 1]}, "destination block 1 appears more than once"),
        (layout, {0: [1], 1: [2]}, "block 1 is both a destination and the source"),
        (layout, {1: [2], 0: [1]}, "block 1 is both a destination and the source"),
    ]
    for cache, info, match in cases:
        with refused(kv, c, match="copy_blocks failed.*" + match):
            copy(plan_copy_blocks, cache, info)


def test_copy_blocks_refuses_aliased_tensors() -> None:
    """Tensor 1 starts one block into tensor 0: tensor 0's block 1 is tensor 1's block 0."""
    kv = KVBuffers(1, 8, 64)
    layout = Layout(np.asarray(kv.addrs * 2, dtype=U64) + np.asarray([0, 64], U64), 512, 8, True)
    with refused(kv, match="overlap"):
        copy(plan_copy_blocks, layout, {0: [1]})


def test_check_copy_block_info() -> None:
    check_copy_block_info({0: [1, 2], 3: (4,), True: []})
    for bad, match in (
        ([(0, [1])], "copy_block_info must be dict, got list"),
        ({"0": [1]}, "copy_block_info keys must be int"),
        ({0: 1}, r"copy_block_info\[0\] must be list or tuple, got int"),
        ({0: [1, "2"]}, r"copy_block_info\[0\]\[1\] must be int, got str"),
        (None, "copy_block_info must be dict, got NoneType"),
    ):
        with pytest.raises(TypeError, match=match):
            check_copy_block_info(bad)


# -- swap_blocks -------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 4])
def test_swap_blocks(threads: int) -> None:
    src, dst = KVBuffers(4, 32, 4096, seed=1), KVBuffers(4, 16, 4096, seed=2)
    mapping = {0: 3, 31: 0, 7: 15, 8: 14}
    with split_threshold(16 << 10):
        copy(plan_swap_blocks, blocks_layout(src), blocks_layout(dst), mapping, threads=threads)
    tensors = list(range(4))
    assert dst.matches(tensors, list(mapping.values()), 1, tensors, list(mapping))
    assert dst.untouched(tensors, [b for b in range(16) if b not in mapping.values()])
    assert src.untouched(tensors, range(32))


def test_swap_blocks_coalesces_runs() -> None:
    src, dst = KVBuffers(3, 16, 512, seed=1), KVBuffers(3, 16, 512, seed=2)
    pieces = copy(
        plan_swap_blocks, blocks_layout(src), blocks_layout(dst), {i: i + 4 for i in range(8)}
    )
    assert pieces.count == 3  # one run of 8 blocks per tensor
    tensors = list(range(3))
    assert dst.matches(tensors, range(4, 12), 1, tensors, range(8))


def test_swap_blocks_within_one_cache() -> None:
    """HOST->HOST within one cache is allowed (dxl stance 2) when no block is read and written."""
    kv = KVBuffers(2, 8, 64, seed=5)
    layout = blocks_layout(kv)
    assert copy(plan_swap_blocks, layout, layout, {1: 1}).count == 0
    copy(plan_swap_blocks, layout, layout, {0: 4, 1: 5})
    assert kv.matches([0, 1], [4, 5], 5, [0, 1], [0, 1])
    with refused(kv, match="destination range overlaps a source range"):
        copy(plan_swap_blocks, layout, layout, {0: 1, 1: 0})


def test_swap_blocks_errors() -> None:
    a, b = KVBuffers(2, 8, 64, seed=1), KVBuffers(2, 4, 64, seed=2)
    wide, three = KVBuffers(2, 8, 128), KVBuffers(3, 8, 64)
    c = Contiguous(2, 8, 64, seed=3)
    la, lb = blocks_layout(a), blocks_layout(b)
    cases: list[tuple[Layout, Layout, dict[int, int], str]] = [
        (c.layout, lb, {0: 0}, "src_cache must be a blocks cache"),
        (la, c.layout, {0: 0}, "dst_cache must be a blocks cache"),
        (la, blocks_layout(wide), {0: 0}, "block sizes differ: src_cache 64 bytes, dst_cache 128"),
        (la, blocks_layout(three), {0: 0}, "same num_tensors, got 2 and 3"),
        (la, lb, {8: 0}, r"src_to_dst keys must lie in \[0, 8\), got 8"),
        (la, lb, {0: 4}, r"src_to_dst values must lie in \[0, 4\), got 4"),
        (la, lb, {0: -1}, r"values must lie in \[0, 4\), got -1"),
        (la, lb, {0: 1, 2: 1}, "destination block 1 appears more than once"),
    ]
    for src, dst, mapping, match in cases:
        with refused(a, b, wide, three, c, match="swap_blocks failed.*" + match):
            copy(plan_swap_blocks, src, dst, mapping)


def test_check_src_to_dst() -> None:
    check_src_to_dst({0: 1, 2: 3})
    check_src_to_dst({})
    for bad, match in (
        ([0, 1], "src_to_dst must be dict, got list"),
        ({"0": 1}, "src_to_dst keys must be int"),
        ({0: [1]}, r"src_to_dst\[0\] must be int, got list"),
        ({0: 1.0}, r"src_to_dst\[0\] must be int, got float"),
    ):
        with pytest.raises(TypeError, match=match):
            check_src_to_dst(bad)


# -- run_pieces --------------------------------------------------------------------------------


def test_run_pieces_empty_and_bad() -> None:
    assert run_pieces(Pieces.empty(), 4) == 0
    wrap = Pieces(np.asarray([2**64 - 8], U64), np.asarray([0], U64), np.asarray([16], U64))
    with pytest.raises(_ffi.NativeError, match="DXL_E_INVAL"):
        run_pieces(wrap, 1)


# -- the overlap rule, against brute force -----------------------------------------------------


@given(
    st.lists(
        st.tuples(st.integers(0, 200), st.integers(0, 200), st.integers(1, 8)),
        min_size=1,
        max_size=8,
    )
)
def test_overlap_check_matches_brute_force(raw: list[tuple[int, int, int]]) -> None:
    dst, src, length = (np.asarray(col, dtype=U64) for col in zip(*raw, strict=True))

    def meet(a: int, la: int, b: int, lb: int) -> bool:
        return a < b + lb and b < a + la

    n = len(raw)
    expect = any(
        meet(int(dst[i]), int(length[i]), int(dst[j]), int(length[j]))
        for i in range(n)
        for j in range(i + 1, n)
    ) or any(
        meet(int(dst[i]), int(length[i]), int(src[j]), int(length[j]))
        for i in range(n)
        for j in range(n)
    )
    try:
        _check_disjoint("op", Pieces(dst, src, length))
    except LLMException:
        assert expect
    else:
        assert not expect
