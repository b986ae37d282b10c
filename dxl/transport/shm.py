"""Memory a same-host peer shares with us, mapped into this process.

A peer shares memory through memfds: its HOST pool (caches it allocated, :mod:`dxl.pool`) and,
with ``dxl.ShareRegistered``, registered framework memory it moved onto memfds
(:mod:`dxl.share`). We map each once, so pieces inside them are a plain memcpy: no syscall per
piece. :class:`Windows` keeps the table the native transfer consults.

The window rule (``docs/security.md``): we map only the peer's own descriptor (duplicated from
the proven peer process, so with the access the *peer* has, never re-opened by path with ours),
and only a memfd the peer opened read-write, sealed against shrinking and growing, at least as
large as announced. Anything else is refused (:class:`WindowRefused`) and its pieces take the
syscalls: no peer can make us write what it may only read, nor shrink memory we map (SIGBUS).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import stat
import threading
from collections.abc import Hashable
from typing import Final

import numpy as np

from .. import _ffi

# Both, or the peer could shrink the memfd under our mapping (our next copy: SIGBUS) or grow it.
REQUIRED_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


class WindowRefused(OSError):
    """A window of the peer that we do not map, and why (its pieces take the syscalls)."""


def check_window(fd: int, offset: int, size: int, ino: int | None = None) -> None:
    """Raise :class:`WindowRefused` unless ``fd`` (our duplicate of the peer's descriptor) may
    be mapped read-write and shared for ``size`` bytes at ``offset``.

    The order matters. Access mode and seals come first: neither touches the file's filesystem,
    and only a shmem file passes them, so a peer's FUSE file never gets to block a later call.
    The size is read only after the seals are seen: before, the peer could still shrink it
    between our fstat and its sealing.
    """
    if size <= 0 or offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
        raise WindowRefused(f"cannot map {size} bytes at offset {offset} of a memfd")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise WindowRefused("the peer's descriptor is not open read-write (it may not write it)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise WindowRefused("the peer's descriptor is not a memfd") from None
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise WindowRefused("the peer's memfd is not sealed against shrinking and growing")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_blksize != mmap.PAGESIZE:
        # hugetlb memfds seal too, but fault from a finite pool of huge pages: shmem only
        raise WindowRefused("the peer's memfd is not plain shared memory (hugetlb?)")
    if ino is not None and st.st_ino != ino:  # the peer closed it; the number was reused
        raise WindowRefused("the peer's descriptor is no longer the memfd it announced")
    if st.st_size < offset + size:
        raise WindowRefused(
            f"the peer's memfd has {st.st_size} bytes, fewer than the {offset + size} announced"
        )


class FdCloser:
    """Closes our duplicates of the peer's descriptors. A shmem file's close is immediate; any
    other file's may call into its filesystem (a FUSE flush, served perhaps by the peer itself,
    which may never answer), so those close on a thread of their own, never on the event loop.
    At most :attr:`limit` wait there: past that, :attr:`full` tells callers to take no more."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._pending: list[int] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    @property
    def full(self) -> bool:
        with self._lock:
            return len(self._pending) >= self.limit

    def close(self, fd: int) -> None:
        try:
            fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # succeeds on shmem files only
        except OSError:
            pass
        else:
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        with self._lock:
            self._pending.append(fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dxl-fd-closer", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    self._wake.wait()
                fd = self._pending[0]
            with contextlib.suppress(OSError):  # the descriptor is gone either way
                os.close(fd)
            with self._lock:
                self._pending.pop(0)


CLOSER: Final = FdCloser()


class PeerMapping:
    """The peer's ``[remote_base, remote_base + size)``, which is ``size`` bytes at ``offset``
    in its memfd, mapped here at ``[local_base, local_base + size)``. ``fd`` is our duplicate of
    the peer's descriptor (the caller keeps and closes it); it must pass :func:`check_window`."""

    def __init__(
        self, fd: int, offset: int, remote_base: int, size: int, ino: int | None = None
    ) -> None:
        check_window(fd, offset, size, ino)
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, offset=offset)
        anchor = ctypes.c_char.from_buffer(self._map)
        self.local_base = ctypes.addressof(anchor)
        del anchor  # the mapping never moves; no buffer export may outlive close()
        self.remote_base = remote_base
        self.size = size

    def close(self) -> None:
        self._map.close()


class Windows:
    """The peer's shared memory mapped here, by owner key (a cache id, or "pool").

    :attr:`table` is what the native transfer reads: sorted, disjoint rows of
    ``[remote_start, remote_end, local_start]`` (where memory registered twice gives overlapping
    mappings, the first serves). A transfer uses the table it started with; a removed mapping
    is unmapped only once no transfer is running, so no copy ever touches an unmapped page.
    """

    def __init__(self) -> None:
        self._by_key: dict[Hashable, list[PeerMapping]] = {}
        self.table = np.zeros((0, 3), dtype=np.uint64)
        self._lock = threading.Lock()
        self._running = 0
        self._retired: list[PeerMapping] = []

    def __len__(self) -> int:
        with self._lock:
            return sum(len(m) for m in self._by_key.values())

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._by_key

    def add(self, key: Hashable, mappings: list[PeerMapping]) -> None:
        self._retire([key], {key: mappings})

    def remove(self, key: Hashable) -> None:
        self._retire([key])

    def close(self) -> None:
        self._retire(None)

    def _retire(
        self, keys: list[Hashable] | None, new: dict[Hashable, list[PeerMapping]] | None = None
    ) -> None:
        """Take ``keys``' mappings (None: all) out of the table, then add ``new``. The old ones
        are unmapped once no transfer runs."""
        with self._lock:
            for key in list(self._by_key) if keys is None else keys:
                self._retired.extend(self._by_key.pop(key, []))
            self._by_key.update(new or {})
            self._rebuild()
            self._sweep()

    def chunks(self, key: Hashable, step: int = 64 << 20) -> list[tuple[int, int]]:
        """``(local address, length)`` pieces of ``key``'s mappings, ``step`` bytes at most."""
        with self._lock:
            return [
                (m.local_base + off, min(step, m.size - off))
                for m in self._by_key.get(key, [])
                for off in range(0, m.size, step)
            ]

    def prefault(self, key: Hashable, addr: int, length: int) -> bool:
        """Fault ``[addr, addr + length)`` of ``key``'s mapping in (blocking), counted as a
        transfer so the mapping cannot go meanwhile. False if it is gone or it failed."""
        with self._lock:
            if not any(
                m.local_base <= addr < m.local_base + m.size for m in self._by_key.get(key, [])
            ):
                return False
            self._running += 1
        try:
            return bool(_ffi.lib.dxl_prefault(addr, length) == 0)
        finally:
            self.leave()

    def enter(self) -> np.ndarray:
        """Start a transfer: the table to use until :meth:`leave`."""
        with self._lock:
            self._running += 1
            return self.table

    def leave(self) -> None:
        with self._lock:
            self._running -= 1
            self._sweep()

    def _rebuild(self) -> None:
        rows = sorted(
            (m.remote_base, m.remote_base + m.size, m.local_base)
            for ms in self._by_key.values()
            for m in ms
        )
        keep: list[tuple[int, int, int]] = []
        for row in rows:  # overlaps (memory registered twice): the first one serves
            if not keep or keep[-1][1] <= row[0]:
                keep.append(row)
        self.table = np.array(keep, dtype=np.uint64).reshape(-1, 3)

    def _sweep(self) -> None:
        if self._running == 0:
            for m in self._retired:
                m.close()
            self._retired.clear()
