"""Data-path transports: objects that move a planned piece list between two processes.

Each transport offers blocking ``read(pieces)`` (remote -> local, a pull) and ``write(pieces)``
(local -> remote, a push). The engine calls them on its own executor; one call moves a whole
request. Today: ``cma`` (cross-memory attach, same host). ``tcp`` and ``cuda`` come later and
plug in here.
"""

from __future__ import annotations

import functools
import os
from typing import Protocol

from . import _ffi
from .plan import Pieces
from .shm import PeerPool


class TransportClosed(Exception):
    """The transport cannot be used: its link was torn down, or it never had a data path."""


class Transport(Protocol):
    name: str

    def read(self, pieces: Pieces) -> int: ...

    def write(self, pieces: Pieces) -> int: ...

    def close(self) -> None: ...


class CmaTransport:
    """process_vm_readv/writev against one peer process, watched through its pidfd.

    With the peer's memfd pool mapped (:meth:`attach_pool`), requests whose remote pieces all
    lie in the pool are copied with memcpy threads instead: no syscall per piece.
    """

    def __init__(self, pid: int, threads: int) -> None:
        out = _ffi.ffi.new("dxl_peer_t **")
        _ffi.check(_ffi.lib.dxl_peer_open(pid, out), f"open peer process {pid}")
        self._peer = _ffi.ffi.gc(out[0], _ffi.lib.dxl_peer_close)
        self._threads = threads
        self._pool: PeerPool | None = None
        self.pid = pid

    @property
    def name(self) -> str:
        return "cma+shm" if self._pool is not None else "cma"

    def attach_pool(self, pool: PeerPool) -> None:
        self._pool = pool

    def read(self, pieces: Pieces) -> int:
        return self._move(0, pieces.dst, pieces.src, pieces)

    def write(self, pieces: Pieces) -> int:
        return self._move(1, pieces.src, pieces.dst, pieces)

    def _move(self, write: int, local, remote, pieces: Pieces) -> int:
        if self._peer is None:
            raise TransportClosed("cma transport is closed")
        pool = self._pool
        if pool is not None and pool.covers(remote, pieces.length):
            return self._copy_shared(write, local, pool.translate(remote), pieces)
        done = _ffi.ffi.new("uint64_t *")
        rc = _ffi.lib.dxl_cma_transfer(
            self._peer,
            write,
            _ffi.as_u64_ptr(local),
            _ffi.as_u64_ptr(remote),
            _ffi.as_u64_ptr(pieces.length),
            pieces.count,
            self._threads,
            done,
        )
        _ffi.check(rc, "cma push" if write else "cma pull")
        return int(done[0])

    def _copy_shared(self, write: int, local, remote, pieces: Pieces) -> int:
        dst, src = (remote, local) if write else (local, remote)
        _ffi.check(
            _ffi.lib.dxl_copy_pieces(
                _ffi.as_u64_ptr(dst),
                _ffi.as_u64_ptr(src),
                _ffi.as_u64_ptr(pieces.length),
                pieces.count,
                self._threads,
            ),
            "shm copy",
        )
        # a dead owner's pool outlives it in our mapping: its bytes cannot be trusted
        if not _ffi.lib.dxl_peer_alive(self._peer):
            raise _ffi.NativeError(_ffi.lib.DXL_E_SRCH, "shm copy", 3)
        return pieces.nbytes

    def close(self) -> None:
        peer, self._peer = self._peer, None
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
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
