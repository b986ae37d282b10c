"""A linked peer that advertises a shared-memory window of its choosing, in a child process.

It speaks the link protocol by hand (``stranger``), as its own real process (its pid and probe are
true, so the engine proves it and links over cma), optionally as another uid. It advertises one
blocks cache whose tensors lie in its own anonymous memory, and a window over that memory backed
by a descriptor of its choice (:data:`KINDS`), in the cache entry (``shm``) or as its pool
(hello's ``pool``). The descriptor's bytes differ from the anonymous memory's, so the bytes a pull
returns tell which path the engine took: the window (mapped) or the syscalls (refused).

The test drives it over a pipe: ``truncate`` (the descriptor to 0 bytes), ``window`` (the
descriptor's bytes), ``memory`` (the anonymous memory's bytes), ``stop``.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import multiprocessing as mp
import os
import threading
from typing import Any

import numpy as np
import stranger

CTX = mp.get_context("spawn")
TOKEN = 0x5EC0_0D_F00D
KINDS = ("file", "unsealed", "grow", "sealed", "small")


def window_bytes(nbytes: int) -> bytes:
    """What the descriptor holds (a memfd kind)."""
    return (np.arange(nbytes, dtype=np.uint32) * 2654435761 % 251).astype(np.uint8).tobytes()


def memory_bytes(nbytes: int) -> bytes:
    """What the anonymous memory under the window holds."""
    return (np.arange(nbytes, dtype=np.uint32) * 40503 % 241 + 7).astype(np.uint8).tobytes()


class WindowStranger:
    """Handle of the child; ``start`` returns once its link is up (or raises what it said)."""

    def __init__(
        self,
        address: tuple[str, int],
        engine_cluster: int,
        cluster_id: int,
        kind: str,
        *,
        num_tensors: int,
        num_blocks: int,
        block_bytes: int,
        secret: str | None = None,
        as_pool: bool = False,
        uid: int | None = None,
        path: str | None = None,
    ) -> None:
        assert kind in KINDS
        self.cluster_id = cluster_id
        self._conn, child = CTX.Pipe()
        args = (child, address, engine_cluster, cluster_id, kind, num_tensors, num_blocks)
        kwargs = dict(block_bytes=block_bytes, secret=secret, as_pool=as_pool, uid=uid, path=path)
        self.proc = CTX.Process(target=_main, args=args, kwargs=kwargs, daemon=True)
        self.proc.start()
        child.close()
        self.pid = self.call_reply(60)

    def call(self, cmd: str, deadline_s: float = 30) -> Any:
        self._conn.send(cmd)
        return self.call_reply(deadline_s)

    def call_reply(self, deadline_s: float) -> Any:
        if not self._conn.poll(deadline_s):
            raise TimeoutError(f"the window stranger gave no answer within {deadline_s} s")
        status, payload = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"window stranger: {payload}")
        return payload

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("stop", 10)
            except (TimeoutError, EOFError, OSError, RuntimeError):
                self.proc.kill()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._conn.close()


def _window_fd(kind: str, nbytes: int, path: str | None) -> int:
    if kind == "file":  # someone else's file, which we may only read
        assert path is not None
        return os.open(path, os.O_RDONLY)
    seals = {
        "unsealed": 0,
        "grow": fcntl.F_SEAL_SHRINK,
        "sealed": fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW,
        "small": fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW,
    }[kind]
    fd = os.memfd_create(f"stranger-{kind}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    size = nbytes // 2 if kind == "small" else nbytes  # "small": fewer bytes than announced
    os.pwrite(fd, window_bytes(nbytes)[:size], 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _drain(sock: Any) -> None:
    """Read and drop whatever the engine sends (its pings), so its writes never stall."""
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def _main(
    conn: Any,
    address: tuple[str, int],
    engine_cluster: int,
    cluster_id: int,
    kind: str,
    num_tensors: int,
    num_blocks: int,
    *,
    block_bytes: int,
    secret: str | None,
    as_pool: bool,
    uid: int | None,
    path: str | None,
) -> None:
    try:
        if uid is not None:  # everything below as that user, with no privilege left
            import encodings.idna  # noqa: F401 - lazily imported by connect; that user may not

            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        tensor_size = num_blocks * block_bytes
        nbytes = num_tensors * tensor_size
        memory = mmap.mmap(-1, nbytes)
        memory[:] = memory_bytes(nbytes)
        base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        probe = ctypes.c_uint64(TOKEN)
        fd = _window_fd(kind, nbytes, path)
        window = [fd, 0, base, nbytes, os.fstat(fd).st_ino]
        claims = stranger.about(cluster_id, probe=(ctypes.addressof(probe), TOKEN))
        claims["heartbeat_ms"] = 600_000  # the engine must not drop us for silence meanwhile
        if as_pool:
            claims["pool"] = window[:1] + window[2:4]  # [fd, base, size]
        entry = stranger.cache_entry(
            1, [base + t * tensor_size for t in range(num_tensors)], tensor_size, num_blocks
        )
        entry["shm"] = [] if as_pool else [window]
        link = stranger.Link(address, engine_cluster, claims, secret, caches=[entry], timeout=30)
        if not link.up:
            raise RuntimeError(f"the link was not set up: {link.ready}")
        link.sock.settimeout(None)
        threading.Thread(target=_drain, args=(link.sock,), daemon=True).start()
    except Exception as exc:  # reported to the test
        conn.send(("err", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", os.getpid()))
    while True:
        cmd = conn.recv()
        if cmd == "truncate":
            os.ftruncate(fd, 0)
            conn.send(("ok", None))
        elif cmd == "window":
            conn.send(("ok", os.pread(fd, nbytes, 0)))
        elif cmd == "memory":
            conn.send(("ok", bytes(memory)))
        elif cmd == "stop":
            conn.send(("ok", None))
            link.close()
            return
        else:
            conn.send(("err", f"unknown command {cmd}"))
