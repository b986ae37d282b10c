"""The ``cma`` transport: cross-memory attach (``process_vm_readv/writev``) to a same-host peer.

Memory the peer shares with us (its memfd pool, registered memory it moved onto memfds) is
mapped here: pieces inside it are copied with memcpy instead, no syscall per piece; the rest of a
request still goes through the syscalls (``dxl_cma_transfer_mapped``). We map the peer's own
descriptors, taken from the proven process with ``pidfd_getfd`` (so with the peer's access), and
only sealed memfds (:func:`dxl.transport.shm.check_window`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from .. import _ffi
from ..memory.plan import Pieces
from ..types import Placement
from .base import Capabilities, Job, Transport, TransportClosed
from .names import CMA
from .shm import CLOSER, PeerMapping, WindowRefused, Windows


class CmaTransport(Transport):
    """process_vm_readv/writev against one peer process, watched through its pidfd.

    Memory the peer shares with us (its memfd pool, registered memory it moved onto memfds) is
    mapped here (:meth:`map_shared`): pieces inside it are copied with memcpy instead, no
    syscall per piece; the rest of a request still goes through the syscalls.
    """

    caps = Capabilities(
        same_host_only=True,
        maps_peer_memory=True,
        inline=True,
        memory=frozenset({Placement.HOST}),
    )

    def __init__(self, pid: int, threads: int) -> None:
        if pid == os.getpid():  # never: a peer naming our pid would aim our copies at ourselves
            raise ValueError("cma towards this very process is refused")
        out = _ffi.ffi.new("dxl_peer_t **")
        _ffi.check(_ffi.lib.dxl_peer_open(pid, out), f"open peer process {pid}")
        self._peer = _ffi.ffi.gc(out[0], _ffi.lib.dxl_peer_close)
        self._threads = threads
        self._windows = Windows()
        self.pid = pid

    @property
    def name(self) -> str:
        return f"{CMA}+shm" if len(self._windows) else CMA

    def share_windows(self, key: Hashable, windows: Sequence[Sequence[int | None]]) -> list[Job]:
        """Map the peer's memfd windows ``(fd, offset, remote_base, size, ino)`` under ``key``
        (a cache id, or "pool"; a key mapped already keeps its mapping). Returns the jobs that
        fault the fresh mapping in: otherwise the first copy through it pays a page fault per
        4 KiB page, 4-5x slower. Raises WindowRefused (an OSError) if one may not be mapped
        (then none is; the pieces take the syscalls)."""
        if key in self._windows:  # a new version of the same registration: same memory
            return []
        self.map_shared(key, windows)
        return [
            functools.partial(self.prefault, key, addr, length)
            for addr, length in self.shared_chunks(key)
        ]

    def drop_windows(self, key: Hashable) -> None:
        self.unmap_shared(key)

    @property
    def shared_windows(self) -> int:
        return len(self._windows)

    def map_shared(self, key: Hashable, windows: Sequence[Sequence[int | None]]) -> None:
        """Map the peer's memfd windows ``(fd, offset, remote_base, size, ino)`` under ``key``.
        Raises WindowRefused (an OSError) if one may not be mapped (then none is)."""
        mappings: list[PeerMapping] = []
        try:
            for fd, offset, base, size, ino in windows:
                own = self._take_fd(_int(fd))
                try:
                    mappings.append(PeerMapping(own, _int(offset), _int(base), _int(size), ino))
                except WindowRefused:
                    raise
                except (OSError, ValueError) as exc:  # mmap's own refusals
                    raise WindowRefused(f"cannot map the peer's memfd: {exc}") from None
                finally:
                    CLOSER.close(own)  # the mapping holds the file
        except OSError:
            for m in mappings:
                m.close()
            raise
        self._windows.add(key, mappings)

    def _take_fd(self, fd: int) -> int:
        """Our duplicate of the peer's descriptor ``fd``: the same open file, with the access
        the peer opened it with. Never re-opened through ``/proc/<pid>/fd``: that would open it
        with *our* credentials (as root, read-write whatever the peer may do)."""
        if self._peer is None:
            raise WindowRefused("cma transport is closed")
        if not 0 <= fd <= 0x7FFF_FFFF:
            raise WindowRefused(f"{fd} is not a file descriptor")
        if CLOSER.full:
            raise WindowRefused("too many of the peer's descriptors are still being closed")
        out = _ffi.ffi.new("int *")
        try:
            _ffi.check(_ffi.lib.dxl_peer_getfd(self._peer, fd, out), f"take fd {fd} of the peer")
        except _ffi.NativeError as exc:
            raise WindowRefused(str(exc)) from None
        return int(out[0])

    def unmap_shared(self, key: Hashable) -> None:
        self._windows.remove(key)

    def has_shared(self, key: Hashable) -> bool:
        return key in self._windows

    def shared_chunks(self, key: Hashable) -> list[tuple[int, int]]:
        """``key``'s mappings cut into pieces for :meth:`prefault`."""
        return self._windows.chunks(key)

    def prefault(self, key: Hashable, addr: int, length: int) -> bool:
        """Fault one piece of ``key``'s mappings in (blocking); False once they are gone."""
        return self._windows.prefault(key, addr, length)

    # The syscalls never wait on the peer (it need not even run): no timeout to apply.
    def read(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        return self._move(0, pieces.dst, pieces.src, pieces)

    def write(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        return self._move(1, pieces.src, pieces.dst, pieces)

    def _move(self, write: int, local: np.ndarray, remote: np.ndarray, pieces: Pieces) -> int:
        if self._peer is None:
            raise TransportClosed("cma transport is closed")
        table = self._windows.enter()
        try:
            done = _ffi.ffi.new("uint64_t *")
            rc = _ffi.lib.dxl_cma_transfer_mapped(
                self._peer,
                write,
                _ffi.as_u64_ptr(local),
                _ffi.as_u64_ptr(remote),
                _ffi.as_u64_ptr(pieces.length),
                pieces.count,
                self._threads,
                _ffi.as_u64_ptr(table),
                table.shape[0],
                done,
            )
        finally:
            self._windows.leave()
        _ffi.check(rc, "cma push" if write else "cma pull")
        return int(done[0])

    def close(self) -> None:
        peer, self._peer = self._peer, None
        self._windows.close()
        if peer is not None:
            _ffi.ffi.release(peer)


def _int(value: Any) -> int:
    if not isinstance(value, int):
        raise WindowRefused(f"window field {value!r} is not an integer")
    return value
