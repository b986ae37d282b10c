"""dxl.ShareRegistered unset (the default): registered memory moves onto memfds where nothing in
the process can have pinned it, so same-host peers memcpy it; never where something may have
(a GPU/RDMA runtime mapped, VmPin above 0), never for tcp-only engines or memory on huge pages;
and "0" (or ``share=False``) turns it off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_share import ALL, BLOCK, BLOCKS, P_ID, TENSORS, decoder, interior, mappings_over

import dxl
from dxl.engine import registrations
from dxl.memory import share
from dxl.memory.pins import pin_hazard
from dxl.memory.share import SHARED, SharedMemory, _read_vmas
from dxl.testing import KVBuffers, anonymous_words

MEMFD = "/memfd:dxl-share (deleted)"


def shared_over(start: int, end: int) -> bool:
    """Whether any mapping of this process in ``[start, end)`` is shared (``rw-s``): given back,
    shared memory becomes a *private* mapping of the same memfd (its name stays)."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split(maxsplit=2)[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo < end and start < hi and perms.endswith("s"):
                return True
    return False


CLEAN_MAPS = (
    "7f0000000000-7f0000001000 r-xp 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    "7f0000002000-7f0000003000 rw-p 00000000 00:00 0 \n"
    "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n"
)


def evidence(tmp_path: Path, vmpin: str | None, extra_maps: str = "") -> str:
    status, maps = tmp_path / "status", tmp_path / "maps"
    status.write_text("Name:\tpython\n" + (f"VmPin:\t{vmpin} kB\n" if vmpin is not None else ""))
    maps.write_text(CLEAN_MAPS + extra_maps)
    return pin_hazard(str(maps), str(status))


def test_pin_hazard_reads_the_runtimes_mapped_and_the_pinned_pages(tmp_path: Path) -> None:
    assert evidence(tmp_path, "0") == ""
    assert "VmPin 8 kB" in evidence(tmp_path, "8")
    assert "no VmPin" in evidence(tmp_path, None)  # no evidence is not evidence of no pin
    lib = "7f1000000000-7f1000100000 r-xp 00000000 08:01 13 /opt/cuda/lib64/libcudart.so.12\n"
    assert "libcudart.so.12 is mapped" in evidence(tmp_path, "0", lib)
    verbs = "7f1000000000-7f1000100000 r-xp 00000000 08:01 13 /usr/lib/libibverbs.so.1.14\n"
    assert "libibverbs" in evidence(tmp_path, "0", verbs)
    dev = "7f2000000000-7f2000001000 rw-s 00000000 00:05 9 /dev/infiniband/uverbs0\n"
    assert "/dev/infiniband/uverbs0" in evidence(tmp_path, "0", dev)
    gpu = "7f2000000000-7f2000001000 rw-s 00000000 00:05 9 /dev/nvidiactl\n"
    assert "/dev/nvidiactl" in evidence(tmp_path, "0", gpu)
    missing = pin_hazard(str(tmp_path / "none"), str(tmp_path / "none"))
    assert "cannot read" in missing
    assert pin_hazard() == ""  # this test process: no device runtime, nothing pinned


async def test_by_default_registered_memory_is_shared_and_peers_memcpy_it(make_peer):
    peer = make_peer(P_ID)  # default options: dxl.ShareRegistered unset
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
    for a in addrs:
        lo, hi = interior(a, BLOCKS * BLOCK)
        assert {n for _, _, n in mappings_over(lo, hi, str(peer.proc.pid))} == {MEMFD}
    buf = KVBuffers(TENSORS, BLOCKS, BLOCK, fill=False)
    async with await decoder(peer) as eng:
        assert eng.stats()["links"][P_ID]["transport"] == "cma+shm"  # the window is mapped
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs)
        src = [0, 3, 17, 40, BLOCKS - 1]
        await eng.pull_blocks(dxl.BlocksCacheKey(P_ID, 0), cache, src, [1, 2, 3, 4, 5])
        assert buf.matches(ALL, [1, 2, 3, 4, 5], 5, ALL, src)
        assert buf.untouched(ALL, [0, *range(6, BLOCKS)])


async def test_the_default_shares_nothing_where_a_pin_may_exist_or_no_peer_maps(monkeypatch):
    buf = KVBuffers(TENSORS, BLOCKS, BLOCK)

    async def register_and_drop(eng: dxl.Engine, **kw: Any) -> int:
        cache = await eng.register_blocks_cache(buf.desc(), buf.addrs, remote_accessible=True, **kw)
        live = SHARED.live()
        await eng.unregister_cache(cache.cache_id)
        return live

    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT) as eng:
        assert await register_and_drop(eng) >= 1  # the default on this clean process: shared
        assert SHARED.live() == 0
        assert await register_and_drop(eng, share=False) == 0  # the per-call opt-out
        monkeypatch.setattr(registrations, "pin_hazard", lambda: "libcuda.so.1 is mapped")
        assert await register_and_drop(eng) == 0
        assert await register_and_drop(eng, share=True) >= 1  # an explicit True still shares
    monkeypatch.undo()
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT, {"dxl.Transport": "tcp"}) as eng:
        assert await register_and_drop(eng) == 0  # no same-host peer maps it: no copy
    async with dxl.Engine(P_ID, dxl.LLMRole.PROMPT, {"dxl.ShareRegistered": "0"}) as eng:
        assert await register_and_drop(eng) == 0  # the engine-wide opt-out
    assert not any(shared_over(a, a + BLOCKS * BLOCK) for a in buf.addrs)
    assert buf.untouched(ALL, list(range(BLOCKS)))


def test_the_default_leaves_huge_pages_alone() -> None:
    buf = KVBuffers(1, 4, 2 << 20, huge_pages=True)  # 8 MiB on transparent huge pages
    lo, hi = buf.addrs[0], buf.addrs[0] + 4 * (2 << 20)
    if not any(v.huge_kb and v.start < hi and lo < v.end for v in _read_vmas()):
        pytest.skip("the kernel gave no transparent huge pages here")
    table = SharedMemory()
    assert table.share([(lo, hi)], auto=True) == []
    assert all("memfd" not in n for _, _, n in mappings_over(lo, hi))  # never moved
    [w] = table.share([(lo, hi)])  # asked for explicitly, it moves
    table.release([w])


def test_an_automatic_share_stays_shared_if_a_pin_may_have_appeared(monkeypatch) -> None:
    """A runtime loaded after registration may have pinned the shared pages: giving them back
    to private memory would leave the device on the memfd's pages, so they stay shared."""
    table = SharedMemory()
    a = anonymous_words(1 << 17)  # 1 MiB
    a[:] = 7
    addr = a.ctypes.data
    [w] = table.share([(addr, addr + a.nbytes)], auto=True)
    monkeypatch.setattr(share, "pin_hazard", lambda: "libcuda.so.1 is mapped")
    table.release([w])
    assert table.live() == 0
    assert {n for _, _, n in mappings_over(addr, addr + a.nbytes)} == {MEMFD}
    assert shared_over(addr, addr + a.nbytes)
    assert (a == 7).all()
    a[0] = 9  # still the owner's memory, writable
    assert a[0] == 9
    monkeypatch.undo()
    b = anonymous_words(1 << 17)
    start, end = b.ctypes.data, b.ctypes.data + b.nbytes
    [w] = table.share([(start, end)], auto=True)
    assert shared_over(start, end)
    table.release([w])  # nothing pinned: private again, as an explicit share is
    assert not shared_over(start, end)
