"""dxl.ShareRegistered loses nothing and leaves nothing behind: no write by another thread is
lost while pages move, the pages are private again once the last registration ended (fork()
copies them), the memfds are sealed, and brk heap memory is refused."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

import dxl
from dxl.memory.share import PAGE, SHARED, SharedMemory, _read_vmas
from dxl.testing import KVBuffers, anonymous_words

WORDS = 32 << 20  # 256 MiB: the move takes long enough for the writer to race it
STRIDE = PAGE // 8  # one word per page


def mappings(lo: int, hi: int) -> list[tuple[str, str]]:
    """(permissions, path) of our mappings over [lo, hi)."""
    return [(v.perms, v.path) for v in _read_vmas() if v.start < hi and lo < v.end]


def _race_a_move(reps: int) -> tuple[bool, int, int]:
    """Move 256 MiB onto a memfd while another thread writes one word per page, once each, in
    random order (each write repeated ``reps`` times to pace the writer). Returns whether the
    writer was still writing when the move ended (the race was run), the writes made, and the
    writes lost."""
    words = anonymous_words(WORDS)
    words[:] = 7  # not all zero: every chunk is copied
    pages = words[::STRIDE]
    order = np.random.default_rng(reps).permutation(pages.size)
    started, done = threading.Event(), threading.Event()
    written = [0]

    def writer() -> None:
        for k, page in enumerate(order):
            value = 1_000_000 + k
            for _ in range(reps):
                pages[page] = value
            written[0] = k + 1
            if k == 0:
                started.set()
            if done.is_set():
                return

    table = SharedMemory()
    thread = threading.Thread(target=writer)
    thread.start()
    assert started.wait(10)
    addr = words.ctypes.data
    windows = table.share([(addr, addr + words.nbytes)])
    raced = written[0] < order.size  # the writer had not finished when the move ended
    done.set()
    thread.join(60)
    try:
        assert windows, "the memory was not shared (no userfaultfd write protection here?)"
        k = written[0]
        lost = int((pages[order[:k]] != 1_000_000 + np.arange(k)).sum())
    finally:
        table.release(windows)
    return raced, k, lost


def test_no_write_is_lost_while_pages_move() -> None:
    """Without write protection about 5% of such writes were lost. The writer is paced until
    it outlasts the move (the race is really run), then no write may be missing."""
    for reps in (1, 4, 16, 64, 256):
        raced, writes, lost = _race_a_move(reps)
        assert lost == 0, f"{lost} of {writes} writes were lost"
        if raced:
            return
    pytest.fail("the writer never outlasted the move: the race was not run")


@pytest.mark.multiproc
def test_pages_are_private_again_after_the_last_registration() -> None:
    words = anonymous_words(1 << 18)
    words[:] = np.arange(words.size, dtype=np.uint64)
    lo, hi = words.ctypes.data, words.ctypes.data + words.nbytes
    table = SharedMemory()
    windows = table.share([(lo, hi)])
    assert windows and all(perms == "rw-s" for perms, _ in mappings(lo, hi))
    words[5] = 555  # written while shared: kept
    table.release(windows)
    assert all(perms == "rw-p" for perms, _ in mappings(lo, hi))
    assert words[5] == 555 and words[6] == 6
    pid = os.fork()
    if pid == 0:  # the child writes its copy: the parent must not see it
        words[7] = 777
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert words[7] == 7


async def test_registrations_share_and_unshare_through_the_engine() -> None:
    buf = KVBuffers(2, 64, 4096, seed=3)
    lo = min(buf.addrs) // PAGE * PAGE
    hi = max(buf.addrs) + 64 * 4096
    async with dxl.Engine(1, dxl.LLMRole.PROMPT, {"dxl.ShareRegistered": "1"}) as eng:
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs, remote_accessible=True)
        assert any(perms == "rw-s" for perms, _ in mappings(lo, hi))
        await eng.unregister_cache(cache.cache_id)
        assert not any(perms == "rw-s" for perms, _ in mappings(lo, hi))
    assert buf.untouched(range(2), range(64))


def test_memfds_are_sealed_against_resizing() -> None:
    words = anonymous_words(1 << 18)
    words[:] = 1
    table = SharedMemory()
    windows = table.share([(words.ctypes.data, words.ctypes.data + words.nbytes)])
    try:
        fd = windows[0].fd
        size = os.fstat(fd).st_size
        for new_size in (size // 2, size * 2, 0):
            with pytest.raises(PermissionError) as err:
                os.ftruncate(fd, new_size)
            assert err.value.errno == errno.EPERM
        assert os.fstat(fd).st_size == size
    finally:
        table.release(windows)


def test_brk_heap_memory_is_refused() -> None:
    # Pages of the brk heap itself (the [heap] mapping; malloc's main arena grows and trims it):
    # a buffer malloc serves need not lie there (a long run's main arena may have gone
    # non-contiguous onto mmap), the heap's own first pages always do.
    heap = next(v for v in _read_vmas() if v.path == "[heap]")
    if heap.end - heap.start < 8 * PAGE:
        pytest.skip(f"the brk heap has {heap.end - heap.start} bytes, fewer than 8 pages")
    addr = heap.start
    table = SharedMemory()
    assert table.share([(addr, addr + 8 * PAGE)]) == []
    assert SHARED.live() == 0
