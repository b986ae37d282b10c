"""dxl.ShareRegistered: registered memory moved onto memfds in place, mapped by same-host peers."""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile

import numpy as np
import pytest
from waiting import async_wait_until

import dxl
from dxl import _ffi
from dxl.errors import LLMStatusCode as S
from dxl.memory.plan import Pieces
from dxl.memory.share import PAGE, SHARED, SharedMemory, _read_vmas
from dxl.testing import KVBuffers, anonymous_words
from dxl.transport.cma import CmaTransport

P_ID, D_ID = 1, 2
TENSORS, BLOCKS, BLOCK = 4, 64, 16384  # 1 MiB tensors: numpy mallocs them off page boundaries
ALL = list(range(TENSORS))
SHARE = {"dxl.ShareRegistered": "1"}


def mappings_over(start: int, end: int, pid: str = "self") -> list[tuple[int, int, str]]:
    """(start, end, name) of every mapping of process ``pid`` overlapping ``[start, end)``."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo < end and start < hi:
                out.append((lo, hi, fields[5].strip() if len(fields) > 5 else ""))
    return out


def interior(addr: int, nbytes: int) -> tuple[int, int]:
    return -(-addr // PAGE) * PAGE, (addr + nbytes) // PAGE * PAGE


# -- moving pages in place --------------------------------------------------------------------


def test_share_keeps_addresses_and_bytes_and_shares_whole_pages_only() -> None:
    table = SharedMemory()
    a = anonymous_words(3 << 17, offset_bytes=24)  # 3 MiB, starting inside a page
    a[:] = np.arange(a.size, dtype=np.uint64)
    ref = a.copy()
    addr = a.ctypes.data
    lo, hi = interior(addr, a.nbytes)
    assert addr % PAGE  # the edges are partial pages
    [w] = table.share([(addr, addr + a.nbytes)])
    assert (w.base, w.size, w.offset) == (lo, hi - lo, 0)
    assert np.array_equal(a, ref) and a.ctypes.data == addr
    names = {name for s, e, name in mappings_over(lo, hi)}
    assert names == {"/memfd:dxl-share (deleted)"}
    # the partial pages around it (neighbours' bytes) stay private
    assert all("memfd" not in n for _, _, n in mappings_over(addr, lo))
    assert all("memfd" not in n for _, _, n in mappings_over(hi, addr + a.nbytes))
    # shared for real: a write through the array shows in another mapping of the memfd
    a[(lo - addr) // 8 + 1] = 0xDEADBEEF
    m = mmap.mmap(w.fd, w.size, offset=w.offset)
    assert np.frombuffer(m, dtype=np.uint64, count=2)[1] == 0xDEADBEEF
    m.close()
    table.release([w])
    assert table.live() == 0
    with pytest.raises(OSError):
        os.fstat(w.fd)  # closed with its last registration
    ref[(lo - addr) // 8 + 1] = 0xDEADBEEF
    assert np.array_equal(a, ref)  # the memory stays valid for its owner


def test_the_same_memory_shared_twice_is_one_memfd() -> None:
    table = SharedMemory()
    a = anonymous_words(1 << 18)
    a[:] = 1
    addr = a.ctypes.data
    [w1] = table.share([(addr, addr + a.nbytes)])
    [w2] = table.share([(addr + PAGE, addr + a.nbytes - PAGE)])  # inside the first: referenced
    assert w2.fd == w1.fd and w2.offset == w2.base - w1.base
    table.release([w1])
    os.fstat(w1.fd)  # still open: the second registration uses it
    table.release([w2])
    assert table.live() == 0


def test_touching_tensors_share_one_span_and_zero_chunks_stay_holes() -> None:
    table = SharedMemory()
    region = mmap.mmap(-1, 96 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    region[5 << 20] = 1  # one byte in the first 32 MiB chunk; the others are all zero
    ws = table.share([(base, base + (48 << 20)), (base + (48 << 20), base + (96 << 20))])
    assert len(ws) == 1 and ws[0].size == 96 << 20
    allocated = os.fstat(ws[0].fd).st_blocks * 512
    assert allocated <= 33 << 20  # the zero chunks were not copied
    assert region[5 << 20] == 1 and region[0] == 0 and region[(96 << 20) - 1] == 0
    table.release(ws)


def test_locked_and_file_backed_memory_is_left_alone() -> None:
    table = SharedMemory()
    libc = ctypes.CDLL(None, use_errno=True)
    locked = np.full(1 << 17, 3, dtype=np.uint64)
    lo, hi = interior(locked.ctypes.data, locked.nbytes)
    if libc.mlock(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo)) != 0:
        pytest.skip(f"mlock refused: errno {ctypes.get_errno()}")
    try:
        before = mappings_over(lo, hi)
        assert table.share([(lo, hi)]) == []
        assert mappings_over(lo, hi) == before
        assert np.all(locked == 3)
    finally:
        libc.munlock(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo))
    with tempfile.TemporaryFile() as f:
        f.truncate(1 << 20)
        fm = mmap.mmap(f.fileno(), 1 << 20)
        base = ctypes.addressof(ctypes.c_char.from_buffer(fm))
        before = mappings_over(base, base + (1 << 20))
        assert table.share([(base, base + (1 << 20))]) == []
        assert mappings_over(base, base + (1 << 20)) == before
        fm.close()
    assert table.share([(PAGE, 3 * PAGE)]) == []  # not mapped at all
    assert table.live() == 0


def test_a_range_partly_shared_already_is_left_alone() -> None:
    table = SharedMemory()
    a = anonymous_words(1 << 18)
    a[:] = 1
    addr = a.ctypes.data
    [w] = table.share([(addr, addr + a.nbytes // 2)])
    assert table.share([(addr + PAGE * 8, addr + a.nbytes)]) == []
    table.release([w])


def test_vmas_are_read_with_their_flags() -> None:
    a = anonymous_words(1 << 18)
    a[:] = 1
    vma = next(v for v in _read_vmas() if v.start <= a.ctypes.data < v.end)
    assert vma.perms == "rw-p" and {"rd", "wr"} <= vma.flags


# -- the mapped transfer (a peer that is this very process) ----------------------------------


def test_mapped_transfer_mixes_memcpy_and_cma_and_checks_windows() -> None:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * PAGE)
    remote_map = mmap.mmap(fd, 4 * PAGE)  # "the peer's memory"
    local_map = mmap.mmap(fd, 4 * PAGE)  # our mapping of its memfd
    other = np.arange(PAGE // 8, dtype=np.uint64) + 77  # peer memory outside any window
    remote = np.frombuffer(remote_map, dtype=np.uint64)
    remote[:] = np.arange(remote.size, dtype=np.uint64)
    rbase = ctypes.addressof(ctypes.c_char.from_buffer(remote_map))
    lbase = ctypes.addressof(ctypes.c_char.from_buffer(local_map))
    dst = np.zeros(3 * PAGE // 8, dtype=np.uint64)
    d = dst.ctypes.data
    pieces = Pieces(
        np.array([d, d + PAGE, d + 2 * PAGE], dtype=np.uint64),
        np.array([rbase, other.ctypes.data, rbase + 3 * PAGE], dtype=np.uint64),
        np.full(3, PAGE, dtype=np.uint64),
    )
    table = np.array([[rbase, rbase + 4 * PAGE, lbase]], dtype=np.uint64)
    out = _ffi.ffi.new("dxl_peer_t **")  # the native call itself, towards ourselves
    assert _ffi.lib.dxl_peer_open(os.getpid(), out) == 0
    peer = _ffi.ffi.gc(out[0], _ffi.lib.dxl_peer_close)
    done = _ffi.ffi.new("uint64_t *")
    rc = _ffi.lib.dxl_cma_transfer_mapped(
        peer,
        0,
        _ffi.as_u64_ptr(pieces.dst),
        _ffi.as_u64_ptr(pieces.src),
        _ffi.as_u64_ptr(pieces.length),
        3,
        1,
        _ffi.as_u64_ptr(table),
        1,
        done,
    )
    assert rc == 0 and done[0] == 3 * PAGE
    assert np.array_equal(dst[:512], remote[:512])
    assert np.array_equal(dst[512:1024], other)
    with pytest.raises(ValueError, match="this very process"):  # never through the transport
        CmaTransport(os.getpid(), 2)
    assert np.array_equal(dst[1024:], remote[1536:])
    bad = np.array([[rbase, rbase, lbase]], dtype=np.uint64)  # empty window
    overlap = np.array(
        [[rbase, rbase + 2 * PAGE, lbase], [rbase + PAGE, rbase + 3 * PAGE, lbase]], dtype=np.uint64
    )
    for windows in (bad, overlap):
        rc = _ffi.lib.dxl_cma_transfer_mapped(
            peer,
            0,
            _ffi.as_u64_ptr(pieces.dst),
            _ffi.as_u64_ptr(pieces.src),
            _ffi.as_u64_ptr(pieces.length),
            3,
            1,
            _ffi.as_u64_ptr(windows),
            windows.shape[0],
            done,
        )
        assert rc == _ffi.lib.DXL_E_INVAL
    del remote
    remote_map.close()
    local_map.close()
    os.close(fd)


# -- two engines -------------------------------------------------------------------------------


async def decoder(peer, options=None):
    eng = dxl.Engine(D_ID, dxl.LLMRole.DECODER, options)
    await eng.start()
    assert (await eng.link_clusters([peer.cluster_info()]))[0] == S.LLM_SUCCESS
    return eng


async def test_pull_and_push_through_shared_registered_memory(make_peer):
    peer = make_peer(P_ID, options=SHARE)
    await peer.acall(
        "register",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BLOCK,
        seed=5,
        model_id=0,
    )
    addrs = await peer.acall("addrs", name="kv")
    for a in addrs:  # the peer's tensors now sit on memfds, but for their partial edge pages
        lo, hi = interior(a, BLOCKS * BLOCK)
        assert {n for _, _, n in mappings_over(lo, hi, str(peer.proc.pid))} == {
            "/memfd:dxl-share (deleted)"
        }
    buf = KVBuffers(TENSORS, BLOCKS, BLOCK, fill=False)
    async with await decoder(peer) as eng:
        link = eng._links.get(P_ID)
        assert eng.stats()["links"][P_ID]["transport"] == "cma+shm"
        table = link.transport._windows.table  # rows [remote_start, remote_end, local_start]
        for a in addrs:  # tensors that touch share one window: each tensor's pages are in one
            lo, hi = interior(a, BLOCKS * BLOCK)
            assert ((table[:, 0] <= lo) & (table[:, 1] >= hi)).any()
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
        key = dxl.BlocksCacheKey(P_ID, 0)
        # first and last blocks touch the partial pages (cma); the others are memcpy
        src = [0, 1, 17, 40, BLOCKS - 1]
        await eng.pull_blocks(key, cache, src, [0, 1, 2, 3, 4])
        assert buf.matches(ALL, [0, 1, 2, 3, 4], 5, ALL, src)
        await eng.pull_blocks(
            key, cache, [9], [9], src_layer_range=range(1, 2), dst_layer_range=range(1, 2)
        )
        assert buf.matches([2, 3], [9], 5, [2, 3], [9]) and buf.untouched([0, 1], [9])
        await eng.push_blocks(key, cache, [0, 4], [BLOCKS - 1, 30])
        args = dict(
            tensors=ALL,
            dst_blocks=[BLOCKS - 1, 30],
            src_seed=5,
            src_tensors=ALL,
            src_blocks=[0, BLOCKS - 1],
        )
        assert await peer.acall("matches", name="kv", args=args)
        await peer.acall("unregister", name="kv")  # the decoder unmaps before it confirms
        assert len(link.transport._windows.table) == 0
        assert eng.stats()["links"][P_ID]["transport"] == "cma"
        with pytest.raises(dxl.LLMException) as err:
            await eng.pull_blocks(key, cache, [3], [5])
        assert err.value.status_code == S.LLM_KV_CACHE_NOT_EXIST
        assert buf.untouched(ALL, [5])


async def test_registrations_after_the_link_are_mapped_and_a_dead_owner_is_never_read(make_peer):
    peer = make_peer(P_ID, options=SHARE)
    buf = KVBuffers(TENSORS, BLOCKS, BLOCK, fill=False)
    async with await decoder(peer) as eng:
        await peer.acall(
            "register",
            name="kv",
            num_tensors=TENSORS,
            num_blocks=BLOCKS,
            block_bytes=BLOCK,
            seed=6,
            model_id=0,
        )
        link = eng._links.get(P_ID)
        addrs = await peer.acall("addrs", name="kv")
        table = link.transport._windows.table  # rows [remote_start, remote_end, local_start]
        for a in addrs:  # tensors that touch share one window: each tensor's pages are in one
            lo, hi = interior(a, BLOCKS * BLOCK)
            assert ((table[:, 0] <= lo) & (table[:, 1] >= hi)).any()
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, [20], [20])
        assert buf.matches(ALL, [20], 6, ALL, [20])
        remote = link.registry.blocks_by_model[0]
        from dxl.memory.plan import block_pieces

        pieces = block_pieces(
            np.asarray(buf.addrs, dtype=np.uint64),
            remote.layout.addrs,
            np.array([21]),
            np.array([21]),
            BLOCK,
        )
        peer.kill()
        peer.proc.join(5)
        # the mapping outlives the owner, but its bytes cannot be trusted: the copy fails
        with pytest.raises(_ffi.NativeError, match="DXL_E_SRCH"):
            link.transport.read(pieces)


def resident_kib(start: int, end: int) -> int:
    """Resident KiB of this process's mappings inside ``[start, end)`` (whole VMAs)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = start <= lo and hi <= end
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


async def test_mappings_are_prefaulted_in_the_background(make_peer):
    """A fresh mapping would pay a page fault per 4 KiB on its first copies: the engine
    faults the peer's shared pages in after mapping them, off the event loop."""
    peer = make_peer(P_ID, options=SHARE)
    await peer.acall(
        "register",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BLOCK,
        seed=5,
        model_id=0,
    )
    async with await decoder(peer) as eng:
        windows = eng._links.get(P_ID).transport._windows
        rows = windows.table.tolist()
        assert 1 <= len(rows) <= TENSORS  # tensors that touch share one window
        sizes_kib = [(end - start) // 1024 for start, end, _ in rows]
        await async_wait_until(
            lambda kib: kib == sizes_kib,
            10,
            f"every mapped window resident ({sizes_kib} KiB)",
            observe=lambda: [
                resident_kib(local, local + (end - start)) for start, end, local in rows
            ],
        )


async def test_with_the_option_off_registered_memory_stays_private(make_peer):
    peer = make_peer(P_ID, options={"dxl.ShareRegistered": "0"})
    await peer.acall(
        "register",
        name="kv",
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BLOCK,
        seed=5,
        model_id=0,
    )
    for a in await peer.acall("addrs", name="kv"):
        assert all(
            "memfd" not in n for _, _, n in mappings_over(a, a + BLOCKS * BLOCK, str(peer.proc.pid))
        )
    async with await decoder(peer) as eng:
        assert eng.stats()["links"][P_ID]["transport"] == "cma"


async def test_bad_input_shares_nothing_and_registrations_release_their_shares():
    buf = KVBuffers(TENSORS, BLOCKS, BLOCK)
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT, SHARE) as eng:
        key = dxl.BlocksCacheKey(P_ID, 0)
        first = await eng.register_blocks_cache(buf.desc(), buf.addrs, key, remote_accessible=True)
        spans = SHARED.live()
        assert 1 <= spans <= TENSORS  # one memfd per run of touching tensors
        other = KVBuffers(TENSORS, BLOCKS, BLOCK, seed=2)
        before = [mappings_over(a, a + BLOCKS * BLOCK) for a in other.addrs]
        with pytest.raises(dxl.LLMException) as err:  # model_id taken: checked before sharing
            await eng.register_blocks_cache(other.desc(), other.addrs, key, remote_accessible=True)
        assert err.value.status_code == S.LLM_PARAM_INVALID
        assert SHARED.live() == spans
        assert [mappings_over(a, a + BLOCKS * BLOCK) for a in other.addrs] == before
        assert other.untouched(ALL, list(range(BLOCKS)))
        await eng.unregister_cache(first.cache_id)
        assert SHARED.live() == 0
        assert buf.untouched(ALL, list(range(BLOCKS)))  # the owner's bytes survive it all
        local = await eng.register_blocks_cache(buf.desc(), buf.addrs)  # not remotely accessible
        assert SHARED.live() == 0
        await eng.unregister_cache(local.cache_id)
        await eng.register_blocks_cache(buf.desc(), buf.addrs, key, remote_accessible=True)
        assert SHARED.live() == spans  # memory shared before is moved onto new memfds

    assert SHARED.live() == 0  # close released it


def test_prefault_maps_pages_and_refuses_bad_ranges() -> None:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * PAGE)
    m = mmap.mmap(fd, 64 * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    m[PAGE : PAGE + 4] = b"keep"
    assert resident_kib(base, base + 64 * PAGE) == PAGE // 1024  # only the page just written
    assert _ffi.lib.dxl_prefault(base, 64 * PAGE) == 0
    assert resident_kib(base, base + 64 * PAGE) * 1024 == 64 * PAGE
    assert m[PAGE : PAGE + 4] == b"keep" and m[0] == 0  # bytes untouched
    assert _ffi.lib.dxl_prefault(base + 1, PAGE) == _ffi.lib.DXL_E_INVAL
    assert _ffi.lib.dxl_prefault(base, 0) == _ffi.lib.DXL_E_INVAL
    m.close()
    os.close(fd)
    assert _ffi.lib.dxl_prefault(base, PAGE) < 0  # no longer mapped: an error, no crash


async def test_share_per_registration_overrides_the_engine_option():
    buf = KVBuffers(TENSORS, BLOCKS, BLOCK)
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT, {"dxl.ShareRegistered": "0"}) as eng:
        cache = await eng.register_blocks_cache(
            buf.desc(), buf.addrs, remote_accessible=True, share=True
        )
        assert SHARED.live() >= 1  # one memfd per run of touching tensors
        await eng.unregister_cache(cache.cache_id)
        assert SHARED.live() == 0
        before = [mappings_over(a, a + BLOCKS * BLOCK) for a in buf.addrs]
        with pytest.raises(dxl.LLMException, match="share=True needs remote_accessible") as err:
            await eng.register_blocks_cache(buf.desc(), buf.addrs, share=True)
        assert err.value.status_code == S.LLM_PARAM_INVALID
        with pytest.raises(TypeError, match="share"):
            await eng.register_cache(buf.desc(), buf.addrs, remote_accessible=True, share="yes")  # type: ignore[arg-type]
        assert [mappings_over(a, a + BLOCKS * BLOCK) for a in buf.addrs] == before
        assert eng.stats()["registered_addrs"] == 0
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT, SHARE) as eng:  # option on, call says no
        await eng.register_cache(buf.desc(), buf.addrs, remote_accessible=True, share=False)
        assert SHARED.live() == 0
    assert buf.untouched(ALL, list(range(BLOCKS)))
