"""Memory a same-host peer shares with us, mapped into this process.

A peer shares memory through memfds: its HOST pool (caches it allocated, :mod:`dxl.pool`) and,
with ``dxl.ShareRegistered``, registered framework memory it moved onto memfds
(:mod:`dxl.share`). We map each once (through ``/proc/<pid>/fd/<fd>``, which the kernel allows
exactly when cross-memory attach is allowed), so pieces inside them are a plain memcpy: no
syscall per piece. :class:`Windows` keeps the table the native transfer consults.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Hashable

import numpy as np

from .. import _ffi


class PeerMapping:
    """The peer's ``[remote_base, remote_base + size)``, which is ``size`` bytes at ``offset``
    in its memfd ``fd``, mapped here at ``[local_base, local_base + size)``."""

    def __init__(
        self, pid: int, fd: int, offset: int, remote_base: int, size: int, ino: int | None = None
    ) -> None:
        if size <= 0 or offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
            raise OSError(f"cannot map {size} bytes at offset {offset} of a memfd")
        path_fd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            st = os.fstat(path_fd)
            if ino is not None and st.st_ino != ino:  # the peer closed it; the number was reused
                raise OSError(f"fd {fd} of pid {pid} is no longer the memfd it announced")
            if st.st_size < offset + size:
                raise OSError(f"memfd of pid {pid} is smaller than the {size} bytes announced")
            self._map = mmap.mmap(path_fd, size, flags=mmap.MAP_SHARED, offset=offset)
        finally:
            os.close(path_fd)
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
