"""The window rule: a peer's shared-memory window is mapped only with the access the peer has to
it, and only if it is a memfd sealed against shrinking and growing, of the announced size.

The engine runs in a child process (``peer``), so a SIGBUS would end only that process and the
test sees it. The peer is a ``window_stranger``: a real linked process that advertises a window
backed by a descriptor of its choosing (another user's file, an unsealed or growable memfd...).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import select
import tempfile

import pytest
from peer import PeerError
from waiting import wait_until
from window_stranger import WindowStranger, memory_bytes, window_bytes

from dxl.config import PoolConfig
from dxl.memory.pool import HostPool
from dxl.memory.share import SharedMemory
from dxl.testing import anonymous_words
from dxl.transport.shm import FdCloser, PeerMapping, WindowRefused, check_window

ENGINE = 1
TENSORS, BLOCKS, BB = 2, 8, 4096
TENSOR = BLOCKS * BB
NBYTES = TENSORS * TENSOR
SECRET = "the-deployment-secret"
NOBODY = 65534


def engine_with_cache(make_peer, secret=None):
    engine = make_peer(ENGINE, options={"dxl.AuthToken": secret} if secret else {})
    engine.call(
        "register", name="kv", num_tensors=TENSORS, num_blocks=BLOCKS, block_bytes=BB, seed=3
    )
    return engine


def stranger_for(engine, cluster_id, kind, **kw):
    s = WindowStranger(
        engine.address,
        ENGINE,
        cluster_id,
        kind,
        num_tensors=TENSORS,
        num_blocks=BLOCKS,
        block_bytes=BB,
        **kw,
    )
    wait_until(
        lambda links: cluster_id in links,
        30,
        f"the engine's link to cluster {cluster_id}",
        observe=lambda: engine.call("stats")["links"],
    )
    return s


def blocks_of(content: bytes, blocks: list[int]) -> list[bytes]:
    """Per tensor, ``blocks`` of the stranger's layout in ``content``, as the engine reads them."""
    return [
        b"".join(content[t * TENSOR + b * BB : t * TENSOR + (b + 1) * BB] for b in blocks)
        for t in range(TENSORS)
    ]


def pull(engine, cluster_id):
    """Pull the stranger's blocks 1, 2 into ours 0, 1; returns what landed, per tensor."""
    engine.call("pull", cluster_id=cluster_id, name="kv", src_blocks=[1, 2], dst_blocks=[0, 1])
    return engine.call("read", name="kv", tensors=list(range(TENSORS)), blocks=[0, 1])


def assert_engine_alive(engine):
    assert engine.proc.is_alive(), f"the engine died (exit code {engine.proc.exitcode})"
    assert engine.call("stats")["cluster_id"] == ENGINE  # and it still answers


@pytest.mark.root
@pytest.mark.multiproc
@pytest.mark.cma
def test_another_user_cannot_make_the_engine_write_a_file_it_may_only_read(make_peer):
    """A root engine once re-opened the peer's descriptor by path, read-write with its own
    credentials, and its push wrote a root-owned file that the peer (nobody) may only read."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the engine must be able to write what the peer may only read")
    folder = tempfile.mkdtemp(prefix="dxl-windows-")
    os.chmod(folder, 0o755)  # nobody may reach the file, and read it
    victim = os.path.join(folder, "root-owned.conf")
    content = bytes(range(256)) * (NBYTES // 256)
    with open(victim, "wb") as f:
        f.write(content)
    os.chmod(victim, 0o644)
    mtime = os.stat(victim).st_mtime_ns
    engine = engine_with_cache(make_peer, SECRET)
    s = stranger_for(engine, 9, "file", secret=SECRET, uid=NOBODY, path=victim)
    try:
        engine.call("push", cluster_id=9, name="kv", src_blocks=[0, 1], dst_blocks=[1, 2])
        with open(victim, "rb") as f:
            assert f.read() == content, "the engine wrote a file that its peer may only read"
        assert os.stat(victim).st_mtime_ns == mtime
        # the push went through the syscalls, into the stranger's own memory
        pushed = engine.call("read", name="kv", tensors=list(range(TENSORS)), blocks=[0, 1])
        assert blocks_of(s.call("memory"), [1, 2]) == pushed
        link = engine.call("stats")["links"][9]
        assert link["transport"] == "cma"
        assert link["windows_refused"] == 1
        assert "read-write" in link["window_refusal"]
        assert_engine_alive(engine)
    finally:
        s.stop()
        os.unlink(victim)
        os.rmdir(folder)


@pytest.mark.multiproc
@pytest.mark.cma
def test_a_peer_that_truncates_its_window_cannot_kill_the_engine(make_peer):
    """An unsealed memfd as the peer's pool, truncated after one good pull: the engine once
    died of SIGBUS on its next pull. Now such a window is never mapped."""
    engine = engine_with_cache(make_peer)
    s = stranger_for(engine, 9, "unsealed", as_pool=True)
    try:
        first = pull(engine, 9)  # the window's bytes if it was mapped, else the process's
        assert first in (blocks_of(b(NBYTES), [1, 2]) for b in (window_bytes, memory_bytes))
        s.call("truncate")
        try:
            again = pull(engine, 9)
        except PeerError as exc:  # failing cleanly is allowed; dying is not
            assert exc.type_name == "LLMException", exc
        except EOFError:
            engine.proc.join(10)
            pytest.fail(f"the engine died on its next pull (exit code {engine.proc.exitcode})")
        else:
            assert again == blocks_of(memory_bytes(NBYTES), [1, 2])  # through the syscalls
        assert_engine_alive(engine)
        link = engine.call("stats")["links"][9]
        assert link["transport"] == "cma"
        assert link["windows_refused"] == 1
        assert "the pool" in link["window_refusal"]
        assert "not sealed" in link["window_refusal"]
    finally:
        s.stop()


@pytest.mark.multiproc
@pytest.mark.cma
def test_only_a_sealed_memfd_of_the_announced_size_is_mapped(make_peer):
    """A growable memfd (sealed against shrinking only) and one smaller than announced are
    refused; a memfd sealed against both, of the right size, is mapped: its pulls and pushes
    are a memcpy through the mapping (its bytes, not the process memory under it, are read)."""
    engine = engine_with_cache(make_peer)
    strangers = {
        11: stranger_for(engine, 11, "grow"),
        12: stranger_for(engine, 12, "small"),
        13: stranger_for(engine, 13, "sealed"),
    }
    try:
        links = engine.call("stats")["links"]
        for cluster_id, why in ((11, "not sealed"), (12, "fewer than")):
            assert links[cluster_id]["transport"] == "cma"
            assert links[cluster_id]["windows_refused"] == 1
            assert why in links[cluster_id]["window_refusal"]
            assert pull(engine, cluster_id) == blocks_of(memory_bytes(NBYTES), [1, 2])
        assert links[13]["transport"] == "cma+shm"
        assert links[13]["windows_refused"] == 0
        assert pull(engine, 13) == blocks_of(window_bytes(NBYTES), [1, 2])
        # a push lands in the memfd, not in the process memory under the window
        engine.call("push", cluster_id=13, name="kv", src_blocks=[0, 1], dst_blocks=[5, 6])
        pushed = engine.call("read", name="kv", tensors=list(range(TENSORS)), blocks=[0, 1])
        assert blocks_of(strangers[13].call("window"), [5, 6]) == pushed
        assert strangers[13].call("memory") == memory_bytes(NBYTES)
        assert_engine_alive(engine)
    finally:
        for s in strangers.values():
            s.stop()


# ---- the rule itself, on descriptors of this process

SEALED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
PAGE = mmap.PAGESIZE


def memfd(size: int = 4 * PAGE, seals: int = SEALED, flags: int = 0) -> int:
    fd = os.memfd_create("window", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | flags)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def read_only(fd: int) -> int:
    """The same memfd opened read-only (what a peer may hold); ``fd`` is closed."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("make", "size", "offset", "why"),
    [
        (lambda tmp: os.open(tmp / "f", os.O_RDWR | os.O_CREAT), PAGE, 0, "not a memfd"),
        (lambda tmp: read_only(memfd()), PAGE, 0, "not open read-write"),
        (lambda tmp: memfd(seals=0), PAGE, 0, "not sealed"),
        (lambda tmp: memfd(seals=fcntl.F_SEAL_SHRINK), PAGE, 0, "not sealed"),
        (lambda tmp: memfd(seals=fcntl.F_SEAL_GROW), PAGE, 0, "not sealed"),
        (lambda tmp: memfd(), 4 * PAGE, PAGE, "fewer than"),
        (lambda tmp: memfd(), 8 * PAGE, 0, "fewer than"),
        (lambda tmp: memfd(), PAGE, 1, "cannot map"),
        (lambda tmp: memfd(), 0, 0, "cannot map"),
    ],
    ids=[
        "file",
        "read-only",
        "unsealed",
        "growable",
        "shrinkable",
        "past-end",
        "small",
        "odd",
        "none",
    ],
)
def test_windows_that_break_the_rule_are_refused(tmp_path, make, size, offset, why) -> None:
    fd = make(tmp_path)
    try:
        with pytest.raises(WindowRefused, match=why):
            PeerMapping(fd, offset, 1 << 40, size)
    finally:
        os.close(fd)


def test_a_descriptor_that_is_no_longer_the_announced_memfd_is_refused() -> None:
    fd = memfd()
    try:
        with pytest.raises(WindowRefused, match="no longer"):
            check_window(fd, 0, PAGE, ino=os.fstat(fd).st_ino + 1)
        check_window(fd, 0, PAGE, ino=os.fstat(fd).st_ino)
    finally:
        os.close(fd)


def test_a_hugetlb_memfd_is_refused() -> None:
    try:
        fd = memfd(size=2 << 20, flags=os.MFD_HUGETLB)
    except OSError as exc:
        pytest.skip(f"no hugetlb memfd here: {exc}")
    try:
        with pytest.raises(WindowRefused, match="plain shared memory"):
            check_window(fd, 0, 2 << 20)
    finally:
        os.close(fd)


def test_a_sealed_memfd_of_the_right_size_is_mapped_shared() -> None:
    fd = memfd(seals=SEALED | fcntl.F_SEAL_SEAL)
    try:
        m = PeerMapping(fd, PAGE, 1 << 40, 3 * PAGE)
        try:
            ctypes.memset(m.local_base, 0x5A, 3 * PAGE)
            assert os.pread(fd, 3 * PAGE, PAGE) == b"\x5a" * 3 * PAGE
            assert (m.remote_base, m.size) == (1 << 40, 3 * PAGE)
        finally:
            m.close()
    finally:
        os.close(fd)


def test_descriptors_of_other_files_close_off_the_calling_thread() -> None:
    """Closing a file that is not shmem may wait on its filesystem (a peer's FUSE flush): it
    happens on the closer's thread. A pipe shows the close: its reader sees the end."""
    closer = FdCloser()
    r, w = os.pipe()
    try:
        closer.close(w)
        ready, _, _ = select.select([r], [], [], 30)
        assert ready and os.read(r, 1) == b""  # the write end is closed
    finally:
        os.close(r)
    fd = memfd()
    closer.close(fd)  # shmem: at once, here
    with pytest.raises(OSError):
        fcntl.fcntl(fd, fcntl.F_GETFD)
    assert not closer.full


def test_our_own_windows_keep_the_rule() -> None:
    """What we advertise (the HOST pool, and registered memory moved onto memfds) is what our
    peers accept: sealed memfds of the announced size."""
    pool = HostPool(PoolConfig(16 * PAGE, 12), "rule", prefault=False)
    try:
        check_window(pool.fd, 0, pool.size)
    finally:
        pool.close()
    words = anonymous_words(1 << 16)
    table = SharedMemory()
    windows = table.share([(words.ctypes.data, words.ctypes.data + words.nbytes)])
    try:
        assert windows, "the memory was not shared (no userfaultfd write protection here?)"
        for w in windows:
            check_window(w.fd, w.offset, w.size, w.ino)
    finally:
        table.release(windows)
