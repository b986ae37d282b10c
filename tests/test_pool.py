"""HostPool: page rounding, first-fit allocation with coalescing, OOM, memfd sharing, lifetime."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest

from dxl.config import PoolConfig
from dxl.errors import LLMException, LLMStatusCode
from dxl.memory.layout import Layout
from dxl.memory.localcopy import plan_copy_cache, run_pieces
from dxl.memory.pool import HostPool, allocate_tensors

PAGE = 4096
OOM = LLMStatusCode.LLM_OUT_OF_MEMORY
INVALID = LLMStatusCode.LLM_PARAM_INVALID


@pytest.fixture
def make_pool() -> Iterator:
    pools: list[HostPool] = []

    def make(pages: int, page_shift: int = 12, **kw: bool) -> HostPool:
        pool = HostPool(PoolConfig(pages << page_shift, page_shift), f"test-{len(pools)}", **kw)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close(force=True)


def state(pool: HostPool) -> tuple:
    return (list(pool._free_start), list(pool._free_len), dict(pool._live))


def as_bytes(addr: int, n: int) -> np.ndarray:
    """A uint8 view of memory at ``addr`` (no buffer export on the pool's mmap)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))


def smaps_entry(base: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that starts at ``base``."""
    fields: dict[str, str] = {}
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if not found:
                found = line.startswith(f"{base:x}-")
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
            if key == "VmFlags":
                break
    return fields


# -- sizes and allocation ----------------------------------------------------------------------


def test_size_and_requests_round_up_to_the_page(make_pool) -> None:
    pool = HostPool(PoolConfig(100_000, 12), "round")
    try:
        assert pool.size == 25 * PAGE and pool.page_size == PAGE
        assert pool.base % PAGE == 0
        a = pool.alloc(1)
        b = pool.alloc(PAGE + 1)
        assert a == pool.base and b == pool.base + PAGE
        assert pool.used == 3 * PAGE and pool.free_bytes == 22 * PAGE
        assert pool.offset_of(b) == PAGE
    finally:
        pool.close(force=True)


def test_default_page_shift_is_64k(make_pool) -> None:
    pool = make_pool(2, page_shift=16)
    a = pool.alloc(10)
    assert pool.alloc(10) - a == 1 << 16
    assert pool.free_bytes == 0
    with pytest.raises(LLMException) as info:
        pool.alloc(1)
    assert info.value.status_code == OOM


def test_alloc_free_coalesce(make_pool) -> None:
    pool = make_pool(8)
    a, b, c = (pool.alloc(PAGE) for _ in range(3))
    pool.free(b)
    assert pool._free_start == [PAGE, 3 * PAGE]  # a hole, then the tail
    pool.free(a)  # merges with b's hole
    assert pool._free_start == [0, 3 * PAGE] and pool._free_len == [2 * PAGE, 5 * PAGE]
    pool.free(c)  # joins the hole and the tail
    assert pool._free_start == [0] and pool._free_len == [8 * PAGE]
    assert pool.used == 0 and pool.live_count == 0 and pool.largest_free == pool.size


def test_free_merges_right_neighbour_only(make_pool) -> None:
    pool = make_pool(4)
    a, b = pool.alloc(PAGE), pool.alloc(PAGE)
    pool.free(b)  # b joins the tail; a stays
    assert pool._free_start == [PAGE] and pool._free_len == [3 * PAGE]
    pool.free(a)
    assert pool._free_start == [0] and pool._free_len == [4 * PAGE]


def test_first_fit_reuses_the_lowest_hole(make_pool) -> None:
    pool = make_pool(8)
    addrs = [pool.alloc(PAGE) for _ in range(4)]
    pool.free(addrs[1])
    pool.free(addrs[2])
    assert pool.alloc(PAGE) == addrs[1]
    assert pool.alloc(2 * PAGE) == pool.base + 4 * PAGE  # the 1-page hole left is too small


def test_fragmentation_oom_names_the_largest_extent(make_pool) -> None:
    pool = make_pool(8)
    addrs = [pool.alloc(PAGE) for _ in range(8)]
    for addr in addrs[::2]:
        pool.free(addr)
    assert pool.free_bytes == 4 * PAGE and pool.largest_free == PAGE
    with pytest.raises(LLMException) as info:
        pool.alloc(2 * PAGE)
    assert info.value.status_code == OOM
    msg = str(info.value)
    assert "'test-0'" in msg and f"requested {2 * PAGE} bytes" in msg
    assert f"{4 * PAGE} bytes free" in msg and f"largest free extent {PAGE} bytes" in msg
    pool.free(addrs[1])  # holes 0, 1, 2 merge
    assert pool.alloc(3 * PAGE) == addrs[0]


def test_oom_message_names_pool_request_and_free(make_pool) -> None:
    pool = make_pool(4)
    with pytest.raises(LLMException) as info:
        pool.alloc(4 * PAGE + 1)
    msg = str(info.value)
    assert info.value.status_code == OOM
    assert "'test-0'" in msg and f"requested {4 * PAGE + 1} bytes ({5 * PAGE}" in msg
    assert f"{4 * PAGE} bytes free" in msg


def test_bad_sizes_and_addresses(make_pool) -> None:
    pool = make_pool(4)
    for bad in (0, -PAGE):
        with pytest.raises(LLMException) as info:
            pool.alloc(bad)
        assert info.value.status_code == INVALID
    with pytest.raises(TypeError, match="nbytes"):
        pool.alloc(1.5)
    a = pool.alloc(2 * PAGE)
    before = state(pool)
    for addr in (a + PAGE, a + 1, pool.base + 3 * PAGE, 0):  # interior, unaligned, free, foreign
        with pytest.raises(LLMException) as info:
            pool.free(addr)
        assert info.value.status_code == INVALID and "not a live allocation" in str(info.value)
    assert state(pool) == before
    pool.free(a)
    with pytest.raises(LLMException) as info:
        pool.free(a)  # double free
    assert info.value.status_code == INVALID
    with pytest.raises(LLMException) as info:
        pool.offset_of(pool.base + pool.size)
    assert info.value.status_code == INVALID
    assert pool.contains(pool.base, pool.size) and not pool.contains(pool.base, pool.size + 1)


# -- allocate_tensors --------------------------------------------------------------------------


def test_allocate_tensors_one_region_each(make_pool) -> None:
    pool = make_pool(16)
    addrs = allocate_tensors(pool, 3, PAGE + 8)
    assert len(set(addrs)) == 3
    assert [pool.offset_of(a) for a in addrs] == [0, 2 * PAGE, 4 * PAGE]
    assert pool.used == 6 * PAGE


@pytest.mark.parametrize("fragmented", [False, True])
def test_allocate_tensors_all_or_nothing(make_pool, fragmented: bool) -> None:
    pool = make_pool(10)
    if fragmented:  # 2-page holes at 0, 4, 8 (free 6 pages, largest 2)
        held = [pool.alloc(2 * PAGE) for _ in range(5)]
        for addr in held[::2]:
            pool.free(addr)
    before = state(pool)
    with pytest.raises(LLMException) as info:
        allocate_tensors(pool, 6, 2 * PAGE - 100, op="allocate_blocks_cache")
    assert info.value.status_code == OOM
    msg = str(info.value)
    assert msg.startswith("allocate_blocks_cache failed, error code is")
    assert "'test-0'" in msg and "6 tensor(s)" in msg and f"{12 * PAGE} in all" in msg
    assert state(pool) == before  # the tensors taken before the failure were given back


def test_allocate_tensors_rejects_empty(make_pool) -> None:
    pool = make_pool(2)
    for n, size in ((0, PAGE), (1, 0)):
        with pytest.raises(LLMException) as info:
            allocate_tensors(pool, n, size)
        assert info.value.status_code == INVALID
    assert pool.used == 0


def test_pool_memory_serves_a_copy(make_pool) -> None:
    """Two caches allocated from one pool, copied with the local-copy path."""
    pool = make_pool(64)
    stride, batches, tensors = 1000, 4, 3
    src = Layout(
        np.asarray(allocate_tensors(pool, tensors, stride * batches), np.uint64),
        stride * batches,
        batches,
        False,
    )
    dst = Layout(
        np.asarray(allocate_tensors(pool, tensors, stride * batches), np.uint64),
        stride * batches,
        batches,
        False,
    )
    rng = np.random.default_rng(0)
    for a in src.addrs:
        as_bytes(int(a), stride * batches)[:] = rng.integers(0, 256, stride * batches)
    assert run_pieces(plan_copy_cache(dst, src, 1, 2), threads=2) == tensors * stride
    for d, s in zip(dst.addrs, src.addrs, strict=True):
        got = as_bytes(int(d), stride * batches)
        assert np.array_equal(got[stride : 2 * stride], as_bytes(int(s), 3 * stride)[2 * stride :])
        assert not got[:stride].any() and not got[2 * stride :].any()


# -- the memfd ---------------------------------------------------------------------------------


def test_memfd_is_shared(make_pool) -> None:
    pool = make_pool(8)
    addr = pool.alloc(3 * PAGE)
    mine = as_bytes(addr, 3 * PAGE)
    mine[:] = np.arange(3 * PAGE) % 251
    fd = os.open(f"/proc/self/fd/{pool.fd}", os.O_RDWR)  # what a same-host peer does
    try:
        other = mmap.mmap(fd, pool.size, flags=mmap.MAP_SHARED)
        theirs = np.frombuffer(other, dtype=np.uint8)
        off = pool.offset_of(addr)
        assert np.array_equal(theirs[off : off + 3 * PAGE], mine)
        theirs[off + 5] = 77  # and writes go both ways
        assert mine[5] == 77
        del theirs
        other.close()
    finally:
        os.close(fd)


def test_memfd_is_cloexec_and_sealed(make_pool) -> None:
    pool = make_pool(4)
    assert not os.get_inheritable(pool.fd)
    assert os.readlink(f"/proc/self/fd/{pool.fd}").startswith("/memfd:test-0")
    with pytest.raises(PermissionError):  # a peer cannot shrink the pages away from under us
        os.ftruncate(pool.fd, PAGE)
    assert os.fstat(pool.fd).st_size == pool.size


@pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"), reason="kernel without THP"
)
def test_huge_page_advice_is_applied(make_pool) -> None:
    """MADV_HUGEPAGE succeeds on a THP kernel (in any mode); whether shared memory really gets huge
    pages is the kernel's shmem_enabled setting, which huge_page_bytes reports."""
    pool = make_pool(1024)  # 4 MiB
    assert "hg" in smaps_entry(pool.base)["VmFlags"].split()
    assert pool.huge_page_bytes in range(0, pool.size + 1)
    with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
        mode = f.read()
    if "[never]" in mode or "[deny]" in mode:
        assert pool.huge_page_bytes == 0


@pytest.mark.parametrize("prefault", [True, False])
def test_prefault(make_pool, prefault: bool) -> None:
    pool = make_pool(256, prefault=prefault)  # 1 MiB
    rss_kib = int(smaps_entry(pool.base)["Rss"].split()[0])
    assert rss_kib == (pool.size >> 10 if prefault else 0)


def test_create_failure_is_oom_and_leaks_no_fd() -> None:
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(LLMException) as info:
        HostPool(PoolConfig(1 << 50, 16), "huge", prefault=False)  # beyond the address space
    assert info.value.status_code == OOM and "'huge'" in str(info.value)
    assert len(os.listdir("/proc/self/fd")) == fds


# -- lifetime ----------------------------------------------------------------------------------


def test_close(make_pool) -> None:
    pool = make_pool(4)
    fd = pool.fd
    a = pool.alloc(PAGE)
    with pytest.raises(LLMException) as info:
        pool.close()
    assert info.value.status_code == LLMStatusCode.LLM_FAILED and "1 live" in str(info.value)
    assert not pool.closed
    pool.free(a)
    pool.close()
    assert pool.closed and "closed" in repr(pool)
    pool.close()  # idempotent
    with pytest.raises(OSError):
        os.fstat(fd)
    for call in (lambda: pool.alloc(PAGE), lambda: pool.free(a)):
        with pytest.raises(LLMException) as info:
            call()
        assert info.value.status_code == INVALID and "closed" in str(info.value)


def test_close_force_and_context_manager() -> None:
    with HostPool(PoolConfig(4 * PAGE, 12), "ctx") as pool:
        pool.alloc(PAGE)
    assert pool.closed


def test_unclosed_pool_warns() -> None:
    pool = HostPool(PoolConfig(4 * PAGE, 12), "leaky")
    fd = pool.fd
    with pytest.warns(ResourceWarning, match="leaky"):
        del pool
        gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)
