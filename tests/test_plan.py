"""Planning: block runs coalesce, large plans on reused scratch arrays equal fresh ones."""

from __future__ import annotations

import numpy as np
import pytest

import dxl
from dxl.memory.plan import SCRATCH_MIN, Scratch, block_pieces
from dxl.testing import KVBuffers


def expected(dst_bases, src_bases, dst, src, bb):
    d = (dst_bases[:, None] + dst[None, :].astype(np.uint64) * np.uint64(bb)).ravel()
    s = (src_bases[:, None] + src[None, :].astype(np.uint64) * np.uint64(bb)).ravel()
    return d, s


def test_runs_coalesce_per_tensor():
    bases = np.array([1 << 30, 1 << 31], dtype=np.uint64)
    p = block_pieces(
        bases, bases + np.uint64(1 << 20), np.array([4, 5, 6, 9]), np.array([0, 1, 2, 7]), 64
    )
    assert p.count == 4  # two runs per tensor
    assert p.length.tolist() == [192, 64, 192, 64]
    assert p.dst.tolist()[:2] == [(1 << 30) + 4 * 64, (1 << 30) + 9 * 64]


def test_large_plans_on_scratch_equal_fresh_ones():
    rng = np.random.default_rng(1)
    tensors, blocks = 64, 2048
    dst_bases = np.arange(tensors, dtype=np.uint64) * np.uint64(1 << 28) + np.uint64(1 << 40)
    src_bases = dst_bases + np.uint64(1 << 36)
    dst = rng.permutation(8192)[:blocks].astype(np.int64)
    src = rng.permutation(8192)[:blocks].astype(np.int64)
    scratch = Scratch()
    for _ in range(3):  # the second and third plans reuse the first one's arrays
        p = block_pieces(dst_bases, src_bases, dst, src, 4096, scratch)
        assert p.count == tensors * blocks >= SCRATCH_MIN
        want_d, want_s = expected(dst_bases, src_bases, dst, src, 4096)
        assert np.array_equal(p.dst, want_d) and np.array_equal(p.src, want_s)
        assert (p.length == 4096).all()
        p.release()
    assert len(scratch._free) == 3


@pytest.mark.multiproc
@pytest.mark.cma
async def test_a_pull_of_65536_pieces_is_byte_exact(make_peer):
    tensors, blocks, bb = 64, 2048, 64
    peer = make_peer(1)
    peer.call(
        "register",
        name="kv",
        num_tensors=tensors,
        num_blocks=blocks,
        block_bytes=bb,
        seed=4,
        model_id=0,
    )
    buf = KVBuffers(tensors, blocks, bb, fill=False)
    rng = np.random.default_rng(2)
    src = rng.permutation(blocks)[:1100].tolist()
    dst = rng.permutation(blocks)[:1100].tolist()
    async with dxl.Engine(2, dxl.LLMRole.DECODER) as eng:
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
        await eng.link_clusters([peer.cluster_info()])
        for _ in range(2):  # twice: the second pull plans on the first one's scratch arrays
            await eng.pull_blocks(dxl.BlocksCacheKey(1, 0), cache, src, dst)
        assert buf.matches(range(tensors), dst, 4, range(tensors), src)
        assert eng.stats()["pull"]["pieces"] >= 2 * SCRATCH_MIN
