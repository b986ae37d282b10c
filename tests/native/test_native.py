"""The native shim through ``dxl._ffi`` only: registry, errors, local copies and CMA transfers.

The CMA tests run a real second process (a tiny Python script on a pipe) that owns a buffer with
a known pattern, and compare every byte moved.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from dxl import _ffi
from dxl._ffi import NativeError, as_u64_ptr, check, ffi, lib

PAGE = mmap.PAGESIZE
LEAK_COUNTERS = (
    "regions_live",
    "registries_live",
    "peers_open",
    "ops_inflight",
    "bytes_registered",
)

cma = pytest.mark.skipif(
    not _ffi.HAS_CMA or lib.dxl_cma_self_test() != lib.DXL_OK,
    reason="process_vm_readv is not available here",
)

# The child: an anonymous mapping of SIZE pattern bytes followed by one PROT_NONE guard page.
# It prints "READY <pid> <addr>", then answers "sha <off> <len>" with the SHA-256 of that range.
CHILD = r"""
import ctypes, hashlib, mmap, sys
import numpy as np
size, seed = int(sys.argv[1]), int(sys.argv[2])
mm = mmap.mmap(-1, size + mmap.PAGESIZE)
buf = np.frombuffer(mm, dtype=np.uint8)
buf[:size] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
addr = buf.ctypes.data
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(addr + size, mmap.PAGESIZE, 0) == 0
print("READY", __import__("os").getpid(), addr, flush=True)
for line in sys.stdin:
    cmd, *a = line.split()
    if cmd == "sha":
        off, n = int(a[0]), int(a[1])
        print(hashlib.sha256(buf[off:off + n].tobytes()).hexdigest(), flush=True)
    elif cmd == "quit":
        break
"""


def pattern(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


class Child:
    """A child process holding `size` pattern bytes at `addr`; `model` mirrors its buffer."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(size), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both PIPEs
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        word, pid, addr = self.stdout.readline().split()
        assert word == "READY"
        self.pid = int(pid)
        self.addr = int(addr)
        self.model = pattern(size, seed)

    def sha(self, off: int, n: int) -> str:
        self.stdin.write(f"sha {off} {n}\n")
        self.stdin.flush()
        return self.stdout.readline().strip()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.stdin.write("quit\n")
            self.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stdout.close()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    before = _ffi.counters()
    yield
    after = _ffi.counters()
    assert {k: after[k] for k in LEAK_COUNTERS} == {k: before[k] for k in LEAK_COUNTERS}


@pytest.fixture(scope="module")
def child() -> Iterator[Child]:
    c = Child(32 << 20, seed=1234)
    yield c
    c.close()


@contextlib.contextmanager
def peer_of(pid: int) -> Iterator[object]:
    out = ffi.new("dxl_peer_t **")
    check(lib.dxl_peer_open(pid, out), f"open peer {pid}")
    try:
        yield out[0]
    finally:
        lib.dxl_peer_close(out[0])


@contextlib.contextmanager
def split_threshold(nbytes: int) -> Iterator[None]:
    old = lib.dxl_split_threshold(nbytes)
    try:
        yield
    finally:
        lib.dxl_split_threshold(old)


def u64(values: object) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.uint64)


def transfer(
    peer: object,
    write: int,
    local: np.ndarray,
    remote: np.ndarray,
    length: np.ndarray,
    *,
    threads: int = 1,
) -> tuple[int, int]:
    done = ffi.new("uint64_t *")
    rc = lib.dxl_cma_transfer(
        peer,
        write,
        as_u64_ptr(local),
        as_u64_ptr(remote),
        as_u64_ptr(length),
        len(length),
        threads,
        done,
    )
    return rc, int(done[0])


def random_pieces(
    rng: np.random.Generator, n: int, max_len: int, space: int
) -> tuple[np.ndarray, np.ndarray]:
    """n non-overlapping (offset, length) pieces inside [0, space), in shuffled order."""
    lens = rng.integers(1, max_len, n, dtype=np.uint64)
    lens[rng.choice(n, n // 50, replace=False)] = 0  # some empty pieces
    gaps = rng.integers(0, 64, n, dtype=np.uint64)
    offs = np.cumsum(gaps + lens) - lens
    assert int(offs[-1] + lens[-1]) <= space
    order = rng.permutation(n)
    return offs[order], lens[order]


def gather(buf: np.ndarray, offs: np.ndarray, lens: np.ndarray) -> bytes:
    return b"".join(
        buf[o : o + n].tobytes() for o, n in zip(offs.tolist(), lens.tolist(), strict=True)
    )


# ---- errors ----------------------------------------------------------------------------------

CODES = {
    "DXL_OK": 0,
    "DXL_E_INVAL": -1,
    "DXL_E_NOMEM": -2,
    "DXL_E_SRCH": -3,
    "DXL_E_PERM": -4,
    "DXL_E_FAULT": -5,
    "DXL_E_SHORT": -6,
    "DXL_E_NOENT": -7,
    "DXL_E_RANGE": -8,
    "DXL_E_IO": -9,
    "DXL_E_UNSUPPORTED": -10,
}


def test_codes_names_and_messages() -> None:
    for name, code in CODES.items():
        assert getattr(lib, name) == code
        assert _ffi.err_name(code) == name
        assert ffi.string(lib.dxl_strerror(code))
    assert _ffi.err_name(-4242) == "DXL_E_UNKNOWN"
    assert ffi.string(lib.dxl_strerror(-4242)) == b"unknown dxl error"


def test_check_raises_native_error() -> None:
    assert check(0, "fine") == 0
    assert check(7, "count") == 7
    out = ffi.new("dxl_registry_t **")
    check(lib.dxl_registry_new(out), "new registry")
    reg = out[0]
    assert lib.dxl_region_remove(reg, 2**63) == lib.DXL_E_NOENT
    with pytest.raises(NativeError) as info:
        check(lib.dxl_region_remove(reg, 2**63), "unregister")
    lib.dxl_registry_free(reg)
    e = info.value
    assert (e.code, e.name, e.errno, e.what) == (-7, "DXL_E_NOENT", 0, "unregister")
    assert str(e) == "unregister: unknown id (DXL_E_NOENT)"
    e = NativeError(-3, "cma read", errno.ESRCH)
    assert str(e) == "cma read: peer process is gone (DXL_E_SRCH, errno 3 ESRCH)"


def test_version_and_flags() -> None:
    assert ffi.string(lib.DXL_VERSION).decode() == _ffi.VERSION
    assert _ffi.HAS_CMA is (sys.platform == "linux")


def test_as_u64_ptr_rejects_wrong_arrays() -> None:
    with pytest.raises(TypeError):
        as_u64_ptr(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError):
        as_u64_ptr(np.zeros(8, dtype=np.uint64)[::2])
    p = as_u64_ptr(u64([1, 2, 3]))
    assert list(p) == [1, 2, 3]


# ---- registry --------------------------------------------------------------------------------


@pytest.fixture
def reg() -> Iterator[object]:
    """A fresh registry, freed at the end (conftest checks that nothing stays registered)."""
    out = ffi.new("dxl_registry_t **")
    check(lib.dxl_registry_new(out), "new registry")
    yield out[0]
    lib.dxl_registry_free(out[0])


def add_region(reg: object, base: int, length: int) -> int:
    out = ffi.new("uint64_t *")
    check(lib.dxl_region_add(reg, base, length, out), "add")
    return int(out[0])


def test_registry_add_check_remove(reg: object) -> None:
    start = _ffi.counters()
    a = add_region(reg, 0x10000, 0x1000)
    b = add_region(reg, 0x30000, 0x2000)
    c = add_region(reg, 0x30000, 0x2000)  # the same memory again: its own id
    d = add_region(reg, 0x8000, 0x100000)  # overlaps everything above
    assert len({a, b, c, d}) == 4 and a < b < c < d
    now = _ffi.counters()
    assert now["regions_live"] == start["regions_live"] + 4
    assert now["bytes_registered"] == start["bytes_registered"] + 0x1000 + 0x4000 + 0x100000

    assert lib.dxl_region_check(reg, 0x10000, 0x1000) == lib.DXL_OK
    assert lib.dxl_region_check(reg, 0x31000, 0x1000) == lib.DXL_OK
    assert lib.dxl_region_check(reg, 0x108000 - 1, 1) == lib.DXL_OK
    assert lib.dxl_region_check(reg, 0x108000 - 1, 2) == lib.DXL_E_RANGE
    assert lib.dxl_region_check(reg, 0x7FFF, 2) == lib.DXL_E_RANGE
    assert lib.dxl_region_check(reg, 2**64 - 1, 2) == lib.DXL_E_RANGE  # wraps
    assert lib.dxl_region_check(reg, 1, 0) == lib.DXL_OK  # empty: touches nothing

    check(lib.dxl_region_remove(reg, d), "remove")
    assert lib.dxl_region_check(reg, 0x10000, 0x1000) == lib.DXL_OK
    assert lib.dxl_region_check(reg, 0x10FFF, 2) == lib.DXL_E_RANGE  # only d spanned the gap
    assert lib.dxl_region_check(reg, 0x20000, 1) == lib.DXL_E_RANGE
    check(lib.dxl_region_remove(reg, b), "remove")
    assert lib.dxl_region_check(reg, 0x30000, 0x2000) == lib.DXL_OK  # c still covers it
    check(lib.dxl_region_remove(reg, c), "remove")
    assert lib.dxl_region_check(reg, 0x30000, 1) == lib.DXL_E_RANGE
    assert lib.dxl_region_remove(reg, c) == lib.DXL_E_NOENT
    check(lib.dxl_region_remove(reg, a), "remove")
    e = add_region(reg, 0x10000, 0x1000)
    assert e > d  # ids are never reused
    check(lib.dxl_region_remove(reg, e), "remove")
    assert _ffi.counters() == start


def test_registry_rejects_bad_regions(reg: object) -> None:
    out = ffi.new("uint64_t *")
    assert lib.dxl_region_add(reg, 0x1000, 0, out) == lib.DXL_E_INVAL
    assert lib.dxl_region_add(reg, 2**64 - 0x1000, 0x1001, out) == lib.DXL_E_INVAL
    assert lib.dxl_region_add(reg, 0x1000, 1, ffi.NULL) == lib.DXL_E_INVAL
    assert lib.dxl_region_add(reg, 2**64 - 0x1000, 0xFFF, out) == lib.DXL_OK  # up to the top
    check(lib.dxl_region_remove(reg, out[0]), "remove")


def test_registry_null_handles() -> None:
    """A NULL registry is DXL_E_INVAL everywhere; freeing NULL is a no-op."""
    out = ffi.new("uint64_t *")
    addr = u64([0x1000])
    assert lib.dxl_registry_new(ffi.NULL) == lib.DXL_E_INVAL
    assert lib.dxl_region_add(ffi.NULL, 0x1000, 1, out) == lib.DXL_E_INVAL
    assert lib.dxl_region_remove(ffi.NULL, 1) == lib.DXL_E_INVAL
    assert lib.dxl_region_check(ffi.NULL, 0x1000, 1) == lib.DXL_E_INVAL
    assert lib.dxl_region_check(ffi.NULL, 0x1000, 0) == lib.DXL_E_INVAL
    rc = lib.dxl_region_check_pieces(ffi.NULL, as_u64_ptr(addr), as_u64_ptr(addr), 1, ffi.NULL)
    assert rc == lib.DXL_E_INVAL
    lib.dxl_registry_free(ffi.NULL)


def test_registries_are_independent() -> None:
    """Two registries in one process: a region of one is unknown to the other, ids count per
    registry, and freeing a registry takes its remaining regions out of the counters."""
    start = _ffi.counters()
    pa, pb = ffi.new("dxl_registry_t **"), ffi.new("dxl_registry_t **")
    check(lib.dxl_registry_new(pa), "new")
    check(lib.dxl_registry_new(pb), "new")
    a, b = pa[0], pb[0]
    assert _ffi.counters()["registries_live"] == start["registries_live"] + 2
    ra = add_region(a, 0x10000, 0x1000)
    rb = add_region(b, 0x50000, 0x2000)
    assert ra == rb == 1  # each registry counts its own ids
    assert lib.dxl_region_check(a, 0x10000, 0x1000) == lib.DXL_OK
    assert lib.dxl_region_check(b, 0x10000, 0x1000) == lib.DXL_E_RANGE
    assert lib.dxl_region_check(b, 0x50000, 0x2000) == lib.DXL_OK
    assert lib.dxl_region_check(a, 0x50000, 0x2000) == lib.DXL_E_RANGE
    assert lib.dxl_region_remove(b, 99) == lib.DXL_E_NOENT
    add_region(b, 0x90000, 0x3000)
    now = _ffi.counters()
    assert now["regions_live"] == start["regions_live"] + 3
    assert now["bytes_registered"] == start["bytes_registered"] + 0x6000
    lib.dxl_registry_free(b)  # with two regions still in it
    now = _ffi.counters()
    assert now["regions_live"] == start["regions_live"] + 1
    assert now["bytes_registered"] == start["bytes_registered"] + 0x1000
    assert lib.dxl_region_check(a, 0x10000, 0x1000) == lib.DXL_OK  # a is untouched
    check(lib.dxl_region_remove(a, ra), "remove")
    lib.dxl_registry_free(a)
    assert _ffi.counters() == start


def test_registry_check_pieces(reg: object) -> None:
    rid = add_region(reg, 0x100000, 0x10000)
    try:
        addr = u64([0x100000, 0x108000, 0x10FFF0, 0x0])
        length = u64([0x10, 0x8000, 0x10, 0])  # the last is empty: fine anywhere
        bad = ffi.new("uint64_t *")
        a, n = as_u64_ptr(addr), as_u64_ptr(length)
        assert lib.dxl_region_check_pieces(reg, a, n, 4, bad) == 0
        length[2] = 0x11
        rc = lib.dxl_region_check_pieces(reg, a, n, 4, bad)
        assert rc == lib.DXL_E_RANGE and bad[0] == 2
        assert lib.dxl_region_check_pieces(reg, ffi.NULL, ffi.NULL, 0, ffi.NULL) == lib.DXL_OK
        rc = lib.dxl_region_check_pieces(reg, ffi.NULL, ffi.NULL, 1, ffi.NULL)
        assert rc == lib.DXL_E_INVAL
    finally:
        check(lib.dxl_region_remove(reg, rid), "remove")


def test_registry_many_threads(reg: object) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            base = 0x1000_0000 * (k + 1)
            for i in range(300):
                rid = add_region(reg, base + i * 0x1000, 0x1000)
                assert lib.dxl_region_check(reg, base + i * 0x1000 + 8, 8) == lib.DXL_OK
                check(lib.dxl_region_remove(reg, rid), "remove")
                assert lib.dxl_region_check(reg, base + i * 0x1000 + 8, 8) == lib.DXL_E_RANGE
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ---- local memory ----------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 3])
def test_copy_pieces(threads: int) -> None:
    rng = np.random.default_rng(7)
    src = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
    dst = np.zeros(8 << 20, dtype=np.uint8)
    soff, lens = random_pieces(rng, 3000, 2000, src.size)
    doff = soff + np.uint64(16)  # the same layout, shifted: still non-overlapping
    split_before = _ffi.counters()["ops_split"]
    with split_threshold(64 << 10):
        rc = lib.dxl_copy_pieces(
            as_u64_ptr(doff + np.uint64(dst.ctypes.data)),
            as_u64_ptr(soff + np.uint64(src.ctypes.data)),
            as_u64_ptr(lens),
            len(lens),
            threads,
        )
    assert rc == lib.DXL_OK
    assert gather(dst, doff, lens) == gather(src, soff, lens)
    untouched = np.ones(dst.size, dtype=bool)
    for o, n in zip(doff.tolist(), lens.tolist(), strict=True):
        untouched[o : o + n] = False
    assert not dst[untouched].any()
    assert _ffi.counters()["ops_split"] == split_before + (threads > 1)


def test_copy_one_large_piece_split() -> None:
    src = np.random.default_rng(3).integers(0, 256, (16 << 20) + 123, dtype=np.uint8)
    dst = np.zeros_like(src)
    split_before = _ffi.counters()["ops_split"]
    with split_threshold(1 << 20):
        check(
            lib.dxl_copy_pieces(
                as_u64_ptr(u64([dst.ctypes.data])),
                as_u64_ptr(u64([src.ctypes.data])),
                as_u64_ptr(u64([src.size])),
                1,
                4,
            ),
            "copy",
        )
    assert np.array_equal(src, dst)
    assert _ffi.counters()["ops_split"] == split_before + 1


def split_copy(threads: int, seed: int, size: int = 4 << 20) -> bool:
    """One split copy of random pieces; True if every byte arrived."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    off, lens = random_pieces(rng, 1000, 3000, size)
    rc = lib.dxl_copy_pieces(
        as_u64_ptr(off + np.uint64(dst.ctypes.data)),
        as_u64_ptr(off + np.uint64(src.ctypes.data)),
        as_u64_ptr(lens),
        len(lens),
        threads,
    )
    return rc == lib.DXL_OK and gather(dst, off, lens) == gather(src, off, lens)


def test_pool_shared_by_concurrent_callers() -> None:
    results: list[bool] = []
    with split_threshold(16 << 10):

        def worker(k: int) -> None:
            results.extend(split_copy(1 + k % 4, seed=k * 100 + i) for i in range(15))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [True] * 75


@pytest.mark.multiproc
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_after_fork() -> None:
    with split_threshold(16 << 10):
        assert split_copy(4, seed=1)  # the pool has workers now
        pid = os.fork()
        if pid == 0:  # the child has no workers: the pool must start afresh
            os._exit(0 if split_copy(4, seed=2) and split_copy(2, seed=3) else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_copy_edge_cases() -> None:
    assert lib.dxl_copy_pieces(ffi.NULL, ffi.NULL, ffi.NULL, 0, 1) == lib.DXL_OK
    assert lib.dxl_copy_pieces(ffi.NULL, ffi.NULL, ffi.NULL, 1, 1) == lib.DXL_E_INVAL
    z = u64([0])
    assert lib.dxl_copy_pieces(as_u64_ptr(z), as_u64_ptr(z), as_u64_ptr(z), 1, 1) == 0
    big = u64([2**64 - 8])
    assert (
        lib.dxl_copy_pieces(as_u64_ptr(big), as_u64_ptr(z), as_u64_ptr(u64([16])), 1, 1)
        == lib.DXL_E_INVAL
    )


def test_split_threshold_roundtrip() -> None:
    old = lib.dxl_split_threshold(0)
    assert old > 0
    assert lib.dxl_split_threshold(12345) == old
    assert lib.dxl_split_threshold(0) == 12345
    assert lib.dxl_split_threshold(old) == 12345


def test_check_readable() -> None:
    buf = np.zeros(64, dtype=np.uint8)
    mm = mmap.mmap(-1, 2 * PAGE)
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    ok = u64([buf.ctypes.data, buf.ctypes.data + 63, base, base + 2 * PAGE - 1])
    assert lib.dxl_check_readable(as_u64_ptr(ok), len(ok)) == lib.DXL_OK
    many = u64(np.arange(3000) % 64 + buf.ctypes.data)  # more than one syscall's worth
    assert lib.dxl_check_readable(as_u64_ptr(many), len(many)) == lib.DXL_OK
    bad = u64([buf.ctypes.data, 8])
    assert lib.dxl_check_readable(as_u64_ptr(bad), 2) == lib.DXL_E_FAULT
    assert lib.dxl_last_errno() == errno.EFAULT
    assert lib.dxl_check_readable(ffi.NULL, 0) == lib.DXL_OK
    assert lib.dxl_check_readable(ffi.NULL, 1) == lib.DXL_E_INVAL
    del mm  # unmapped now (no exported buffers remain)


# ---- CMA -------------------------------------------------------------------------------------


def test_cma_self_test() -> None:
    if not _ffi.HAS_CMA:
        pytest.skip("no CMA in this build")
    assert lib.dxl_cma_self_test() == lib.DXL_OK


def test_peer_open_bad_pid() -> None:
    out = ffi.new("dxl_peer_t **")
    assert lib.dxl_peer_open(0, out) == lib.DXL_E_INVAL
    assert lib.dxl_peer_open(-5, out) == lib.DXL_E_INVAL
    assert lib.dxl_peer_alive(ffi.NULL) == lib.DXL_E_INVAL
    lib.dxl_peer_close(ffi.NULL)


@cma
@pytest.mark.multiproc
@pytest.mark.cma
def test_peer_getfd_keeps_the_peers_access_mode(tmp_path) -> None:
    """The descriptor we take is the peer's own open file, read-only if the peer's is: never a
    fresh open with our credentials."""
    path = tmp_path / "file"
    path.write_bytes(b"x" * PAGE)
    with open(path, "rb") as f:  # the child's stdin: fd 0, read-only
        proc = subprocess.Popen(["sleep", "60"], stdin=f)
    out = ffi.new("int *")
    try:
        with peer_of(proc.pid) as peer:
            if not lib.dxl_peer_has_pidfd(peer):
                pytest.skip("no pidfd here: dxl_peer_getfd is unsupported")
            check(lib.dxl_peer_getfd(peer, 0, out), "take the child's stdin")
            try:
                assert os.fstat(out[0]).st_ino == path.stat().st_ino
                assert fcntl.fcntl(out[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            finally:
                os.close(out[0])
            assert lib.dxl_peer_getfd(peer, 999, out) == lib.DXL_E_IO
            assert lib.dxl_last_errno() == errno.EBADF
            assert lib.dxl_peer_getfd(peer, -1, out) == lib.DXL_E_INVAL
            assert lib.dxl_peer_getfd(ffi.NULL, 0, out) == lib.DXL_E_INVAL
    finally:
        proc.kill()
        proc.wait()


@cma
@pytest.mark.multiproc
@pytest.mark.cma
@pytest.mark.parametrize("threads", [1, 4])
def test_pull_random_pieces(child: Child, threads: int) -> None:
    rng = np.random.default_rng(11 + threads)
    roff, lens = random_pieces(rng, 3000, 6000, child.size)  # > 2 * IOV_MAX pieces
    local = np.full(int(np.sum(lens)) + 3000 * 8, 0xAB, dtype=np.uint8)
    loff = np.cumsum(lens + np.uint64(8)) - lens  # packed, 8-byte gaps, a different order
    with peer_of(child.pid) as peer, split_threshold(256 << 10):
        assert lib.dxl_peer_alive(peer) == 1
        assert lib.dxl_peer_pid(peer) == child.pid
        rc, done = transfer(
            peer,
            0,
            loff + np.uint64(local.ctypes.data),
            roff + np.uint64(child.addr),
            lens,
            threads=threads,
        )
    assert rc == lib.DXL_OK
    assert done == int(lens.sum())
    assert gather(local, loff, lens) == gather(child.model, roff, lens)
    mask = np.ones(local.size, dtype=bool)
    for o, n in zip(loff.tolist(), lens.tolist(), strict=True):
        mask[o : o + n] = False
    assert (local[mask] == 0xAB).all()  # nothing written outside the pieces


@cma
@pytest.mark.multiproc
@pytest.mark.cma
def test_pull_large_request_is_split(child: Child) -> None:
    # One 20 MiB piece and a few small ones: over the default threshold, so it runs on 2 threads.
    roff = u64([4 << 20, 100, 0, 30 << 20])
    lens = u64([20 << 20, 5000, 64, 12345])
    local = np.zeros(int(lens.sum()), dtype=np.uint8)
    loff = np.cumsum(lens) - lens
    split_before = _ffi.counters()["ops_split"]
    with peer_of(child.pid) as peer:
        rc, done = transfer(
            peer,
            0,
            loff + np.uint64(local.ctypes.data),
            roff + np.uint64(child.addr),
            lens,
            threads=2,
        )
    assert (rc, done) == (lib.DXL_OK, int(lens.sum()))
    assert _ffi.counters()["ops_split"] == split_before + 1
    assert local.tobytes() == gather(child.model, roff, lens)


@cma
@pytest.mark.multiproc
@pytest.mark.cma
@pytest.mark.parametrize("threads", [1, 2])
def test_push_random_pieces(child: Child, threads: int) -> None:
    rng = np.random.default_rng(99 + threads)
    roff, lens = random_pieces(rng, 2500, 3000, child.size)
    data = rng.integers(0, 256, int(lens.sum()), dtype=np.uint8)
    loff = np.cumsum(lens) - lens
    with peer_of(child.pid) as peer, split_threshold(128 << 10):
        rc, done = transfer(
            peer,
            1,
            loff + np.uint64(data.ctypes.data),
            roff + np.uint64(child.addr),
            lens,
            threads=threads,
        )
    assert (rc, done) == (lib.DXL_OK, int(lens.sum()))
    for o, n, lo in zip(roff.tolist(), lens.tolist(), loff.tolist(), strict=True):
        child.model[o : o + n] = data[lo : lo + n]
    assert child.sha(0, child.size) == hashlib.sha256(child.model.tobytes()).hexdigest()


@cma
@pytest.mark.multiproc
@pytest.mark.cma
def test_fault_after_partial_progress(child: Child) -> None:
    local = np.zeros(3 * PAGE + 10000, dtype=np.uint8)
    with peer_of(child.pid) as peer:
        # A good piece, then an unmapped remote address: the first piece lands, then EFAULT.
        rc, done = transfer(
            peer,
            0,
            u64([local.ctypes.data, local.ctypes.data + 10000]),
            u64([child.addr, 0x1000]),
            u64([10000, 100]),
        )
        assert (rc, done) == (lib.DXL_E_FAULT, 10000)
        assert lib.dxl_last_errno() == errno.EFAULT
        assert local[:10000].tobytes() == child.model[:10000].tobytes()
        # A piece running into the child's PROT_NONE guard page: the kernel stops mid-piece and
        # the resumed call starts at that exact byte, which faults.
        local[:] = 0
        start = child.size - 2 * PAGE - 7
        rc, done = transfer(
            peer, 0, u64([local.ctypes.data]), u64([child.addr + start]), u64([3 * PAGE])
        )
        assert (rc, done) == (lib.DXL_E_FAULT, 2 * PAGE + 7)
        assert local[:done].tobytes() == child.model[start:].tobytes()
        # An unmapped local address faults too.
        rc, _ = transfer(peer, 0, u64([8]), u64([child.addr]), u64([16]))
        assert rc == lib.DXL_E_FAULT
        with pytest.raises(NativeError) as info:
            check(transfer(peer, 1, u64([local.ctypes.data]), u64([16]), u64([16]))[0], "cma write")
        assert info.value.name == "DXL_E_FAULT"
        assert "errno 14 EFAULT" in str(info.value)


@cma
@pytest.mark.multiproc
@pytest.mark.cma
def test_split_transfer_with_fault(child: Child) -> None:
    # Eight 1 MiB pieces on 4 threads; the sixth points nowhere. The call fails with EFAULT, the
    # other chunks still land (or stop early), and bytes_done counts only what moved.
    lens = u64([1 << 20] * 8)
    roff = u64([i << 20 for i in range(8)]) + np.uint64(child.addr)
    roff[5] = 0x1000
    local = np.zeros(8 << 20, dtype=np.uint8)
    loff = u64([i << 20 for i in range(8)]) + np.uint64(local.ctypes.data)
    with peer_of(child.pid) as peer, split_threshold(1 << 20):
        rc, done = transfer(peer, 0, loff, roff, lens, threads=4)
    assert rc == lib.DXL_E_FAULT
    assert lib.dxl_last_errno() == errno.EFAULT
    assert done <= 7 << 20
    assert local[: 5 << 20].tobytes() == child.model[: 5 << 20].tobytes() or done < 5 << 20


@cma
@pytest.mark.multiproc
@pytest.mark.cma
def test_transfer_bad_arguments(child: Child) -> None:
    one = u64([1])
    with peer_of(child.pid) as peer:
        assert transfer(peer, 2, one, one, one)[0] == lib.DXL_E_INVAL
        assert (
            lib.dxl_cma_transfer(peer, 0, ffi.NULL, ffi.NULL, ffi.NULL, 1, 1, ffi.NULL)
            == lib.DXL_E_INVAL
        )
        assert (
            lib.dxl_cma_transfer(peer, 0, ffi.NULL, ffi.NULL, ffi.NULL, 0, 1, ffi.NULL)
            == lib.DXL_OK
        )
        assert transfer(peer, 0, u64([2**64 - 4]), one, u64([8]))[0] == lib.DXL_E_INVAL
        assert transfer(peer, 0, one, one, u64([0, 0])[:1]) == (lib.DXL_OK, 0)
    assert (
        lib.dxl_cma_transfer(ffi.NULL, 0, ffi.NULL, ffi.NULL, ffi.NULL, 0, 1, ffi.NULL)
        == lib.DXL_E_INVAL
    )


@cma
@pytest.mark.multiproc
@pytest.mark.cma
def test_dead_peer() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    buf = np.zeros(64, dtype=np.uint8)
    try:
        with peer_of(proc.pid) as peer:
            assert lib.dxl_peer_alive(peer) == 1
            has_pidfd = lib.dxl_peer_has_pidfd(peer)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert lib.dxl_peer_alive(peer) == 0
            rc, done = transfer(peer, 0, u64([buf.ctypes.data]), u64([0x10000]), u64([64]))
            assert (rc, done) == (lib.DXL_E_SRCH, 0)
            with pytest.raises(NativeError) as info:
                check(rc, "cma read")
            assert info.value.name == "DXL_E_SRCH"
            assert str(info.value) == ("cma read: peer process is gone (DXL_E_SRCH, errno 3 ESRCH)")
        if has_pidfd:  # pidfd_open on a reaped pid (not reused this fast)
            out = ffi.new("dxl_peer_t **")
            assert lib.dxl_peer_open(proc.pid, out) == lib.DXL_E_SRCH
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()
