"""Data-path transports: objects that move a planned piece list between two processes.

Each transport offers blocking ``read(pieces)`` (remote -> local, a pull) and ``write(pieces)``
(local -> remote, a push). The engine calls them on its own executor; one call moves a whole
request. Today: ``cma`` (cross-memory attach, same host). ``tcp`` and ``cuda`` come later and
plug in here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Hashable, Sequence
from typing import Protocol

from . import _ffi
from .plan import Pieces
from .shm import PeerMapping, Windows


class TransportClosed(Exception):
    """The transport cannot be used: its link was torn down, or it never had a data path."""


class Transport(Protocol):
    name: str

    def read(self, pieces: Pieces) -> int: ...

    def write(self, pieces: Pieces) -> int: ...

    def close(self) -> None: ...


class CmaTransport:
    """process_vm_readv/writev against one peer process, watched through its pidfd.

    Memory the peer shares with us (its memfd pool, registered memory it moved onto memfds) is
    mapped here (:meth:`map_shared`): pieces inside it are copied with memcpy instead, no
    syscall per piece; the rest of a request still goes through the syscalls.
    """

    def __init__(self, pid: int, threads: int) -> None:
        out = _ffi.ffi.new("dxl_peer_t **")
        _ffi.check(_ffi.lib.dxl_peer_open(pid, out), f"open peer process {pid}")
        self._peer = _ffi.ffi.gc(out[0], _ffi.lib.dxl_peer_close)
        self._threads = threads
        self._windows = Windows()
        self.pid = pid

    @property
    def name(self) -> str:
        return "cma+shm" if len(self._windows) else "cma"

    def map_shared(self, key: Hashable, windows: Sequence[Sequence[int | None]]) -> None:
        """Map the peer's memfd windows ``(fd, offset, remote_base, size, ino)`` under ``key``
        (a cache id, or "pool"). Raises OSError if one cannot be mapped (then none is)."""
        mappings: list[PeerMapping] = []
        try:
            for fd, offset, base, size, ino in windows:
                mappings.append(PeerMapping(self.pid, fd, offset, base, size, ino))
        except OSError:
            for m in mappings:
                m.close()
            raise
        self._windows.add(key, mappings)

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

    def read(self, pieces: Pieces) -> int:
        return self._move(0, pieces.dst, pieces.src, pieces)

    def write(self, pieces: Pieces) -> int:
        return self._move(1, pieces.src, pieces.dst, pieces)

    def _move(self, write: int, local, remote, pieces: Pieces) -> int:
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


class Unreachable:
    """Stands for the missing data path to a peer that neither shares our host nor runs a
    data server: the peer can reach us, we cannot reach it."""

    name = "none"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def read(self, pieces: Pieces) -> int:
        raise TransportClosed(self.reason)

    def write(self, pieces: Pieces) -> int:
        raise TransportClosed(self.reason)

    def close(self) -> None:
        pass


@functools.cache
def host_identity() -> str:
    """Identify the kernel and pid namespace: CMA works only between equal identities."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return f"{boot}/pidns:{pidns}"
