"""A same-host peer's memfd pool, mapped into this process.

Caches that an engine allocates itself live in its memfd-backed HOST pool (:mod:`dxl.pool`).
A peer on the same host maps that memfd once at link time (through ``/proc/<pid>/fd/<fd>``,
which the kernel allows exactly when cross-memory attach is allowed), so a transfer whose
remote pieces all lie in the pool is a plain multi-threaded memcpy: no syscall per piece.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np


class PeerPool:
    """The mapping of one peer's pool: remote addresses ``[remote_base, remote_base + size)``
    appear here at ``[local_base, local_base + size)``."""

    def __init__(self, pid: int, fd: int, remote_base: int, size: int) -> None:
        path_fd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(path_fd).st_size < size:
                raise OSError(f"pool of pid {pid} is smaller than the {size} bytes announced")
            self._map = mmap.mmap(path_fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(path_fd)
        anchor = ctypes.c_char.from_buffer(self._map)
        self.local_base = ctypes.addressof(anchor)
        del anchor  # the mapping never moves; no buffer export may outlive close()
        self.remote_base = remote_base
        self.size = size

    def covers(self, remote: np.ndarray, length: np.ndarray) -> bool:
        """True if every piece ``[remote[i], remote[i] + length[i])`` lies in the pool."""
        lo = np.uint64(self.remote_base)
        hi = np.uint64(self.remote_base + self.size)
        return bool(np.all((remote >= lo) & (remote + length <= hi)))

    def translate(self, remote: np.ndarray) -> np.ndarray:
        return remote - np.uint64(self.remote_base) + np.uint64(self.local_base)

    def close(self) -> None:
        self._map.close()
