"""The ``tcp`` transport's server: an engine's native data server and the listener feeding it.

:class:`DataServer` listens on a TCP port (asyncio). Each new connection runs the
:mod:`dxl.control.auth` handshake (purpose ``"data"``) with a timeout and then receives the
server's instance id; then its file descriptor is handed to the native data server
(``dxl_tcp_server_adopt``), which serves reads and writes of the memory registered in the
server's own :class:`~dxl.memory.regions.RegionRegistry` only (never another registry's, such as
another engine's in the same process), on its own threads, until the connection closes. A
connection that fails the handshake, or sends garbage, is closed; nothing else is affected. The
client side is :mod:`dxl.transport.tcp`.

Each adopted connection is tagged with the key it authenticated with (:func:`key_tag` of the key
id): :meth:`DataServer.revoke` cuts every connection of one key at once, which the engine does
when a link ends and its key goes. The native server holds at most ``DXL_TCP_MAX_CONNS``
connections, ``DXL_TCP_MAX_CONNS_PER_TAG`` per key (more are closed after the handshake), and a
connection keeps at most ``DXL_TCP_CONN_BUF_KEEP`` bytes of request buffers between requests.
Every warning a stranger can trigger (a refused handshake, a connection over the limits) is
rate-limited: a burst, then a count (reported at the latest when the server closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import logging
import os
import socket
from typing import Any

from .. import _ffi
from ..control.auth import AuthError, KeyLookup, authenticate_sock_async, normalize_secret
from ..guard import PendingCap, RateLimitedLog
from ..memory.regions import RegionRegistry
from .tcp import DEFAULT_SOCK_BUF, PURPOSE, encode_instance, is_loopback, tune

__all__ = ["DataServer", "key_tag"]

log = logging.getLogger("dxl")


def key_tag(key_id: bytes) -> int:
    """The native server's connection tag for a key id: its first 8 bytes, little-endian (zeros
    for the deployment's single secret, or no secret)."""
    return int.from_bytes(key_id[:8].ljust(8, b"\0"), "little")


class DataServer:
    """An engine's native data server and the asyncio listener that feeds it.

    Create with ``await DataServer.start(...)``; stop with ``await close()``.
    """

    def __init__(self) -> None:  # use start()
        self._native: Any = None
        self._registry: RegionRegistry | None = None
        self._lsock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        # a flood of silent connections sheds the oldest handshake rather than locking real
        # peers out: a real peer completes its handshake in milliseconds
        self._pending = PendingCap(128)
        self._secret: bytes | KeyLookup | None = None
        self._instance = b"\0"
        self._auth_timeout = 10.0
        self._sock_buf: int | None = None
        self.address: tuple[str, int] = ("", 0)
        self.instance = ""
        self.auth_failures = 0
        self._warn = RateLimitedLog(log)

    def __repr__(self) -> str:
        return f"DataServer(address={self.address!r}, secret={'set' if self._secret else 'none'})"

    @classmethod
    async def start(
        cls,
        host: str,
        port: int,
        secret: str | bytes | KeyLookup | None,
        *,
        registry: RegionRegistry,
        instance: str = "",
        threads: int = 2,
        auth_timeout: float = 10.0,
        sock_buf: int | None = DEFAULT_SOCK_BUF,
        allow_insecure: bool = False,
        backlog: int = 128,
    ) -> DataServer:
        """Listen on ``host:port`` (port 0: any free port, see :attr:`address`) and start the
        native server with ``threads`` threads.

        Args:
            registry: the memory this server serves: every request is checked against it and
                no other. It must stay open until :meth:`close` returned (closing it before is
                refused).
            secret: the shared secret (None or empty: no authentication, both ends must agree),
                or a lookup from the key id a client names to its key (the engine's per-link
                keys: a connection for a link that ended is refused).
            instance: the id sent to every client after the handshake (the engine's incarnation).
            auth_timeout: seconds a new connection has to complete the handshake.
            sock_buf: SO_SNDBUF/SO_RCVBUF of accepted connections (None: kernel autotuning).
            allow_insecure: listen without a secret on a non-loopback address. Without it that is
                refused with ValueError: anyone who can reach the port could read and write every
                remotely-accessible registration.

        Raises:
            ValueError: no secret on a non-loopback address without ``allow_insecure``.
            OSError: cannot listen.
            NativeError: the native server would not start.
        """
        self = cls()
        self._secret = secret if callable(secret) else normalize_secret(secret)
        if self._secret is None and not allow_insecure and not is_loopback(host):
            raise ValueError(
                f"refusing to serve data on {host!r} without a shared secret: set one, listen "
                "on a loopback address, or allow this explicitly"
            )
        self._instance = encode_instance(instance)
        self.instance = instance
        self._auth_timeout = auth_timeout
        self._sock_buf = sock_buf
        out = _ffi.ffi.new("dxl_tcp_server_t **")
        _ffi.check(
            _ffi.lib.dxl_tcp_server_start(threads, registry.native, out), "start tcp data server"
        )
        self._native = out[0]
        registry.attach()  # after the start: close() detaches exactly when there is a server
        self._registry = registry
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, sockaddr = infos[0]
            lsock = socket.socket(family, socket.SOCK_STREAM)
            try:
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind(sockaddr)
                lsock.listen(backlog)
                lsock.setblocking(False)
            except BaseException:
                lsock.close()
                raise
            self._lsock = lsock
            host, port = lsock.getsockname()[:2]
            self.address = (host, port)
            self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        except BaseException:
            await self.close()
            raise
        log.info("dxl: tcp data server on %s:%d", *self.address)
        return self

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._lsock is not None
        while True:
            try:
                conn, peer = await loop.sock_accept(self._lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if exc.errno in (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM):
                    self._warn.warning("accept", "dxl: tcp data server cannot accept: %s", exc)
                    await asyncio.sleep(0.1)
                    continue
                if self._lsock is None or self._lsock.fileno() < 0:
                    return
                self._warn.warning("accept", "dxl: tcp data server accept failed: %s", exc)
                await asyncio.sleep(0.01)
                continue
            if len(self._pending) >= self._pending.cap:
                self._warn.warning(
                    "handshake-shed",
                    "dxl: tcp data server: %d handshakes in progress, dropping the oldest for %s",
                    len(self._pending),
                    peer,
                )
            self._pending.admit(loop.create_task(self._admit(conn, peer)))

    async def _admit(self, conn: socket.socket, peer: Any) -> None:
        """Handshake, instance id, then hand the socket to the native server."""
        try:
            conn.setblocking(False)
            tune(conn, self._sock_buf)
            key_id = await authenticate_sock_async(
                conn, self._secret, role="server", purpose=PURPOSE, timeout=self._auth_timeout
            )
            await asyncio.get_running_loop().sock_sendall(conn, self._instance)
        except asyncio.CancelledError:
            conn.close()
            raise
        except (AuthError, OSError) as exc:
            self.auth_failures += 1
            # a stranger makes as many of these as it opens connections: a burst, then a count
            self._warn.warning(
                "refused-data", "dxl: tcp data server refused a connection from %s: %s", peer, exc
            )
            conn.close()
            return
        if self._native is None:
            conn.close()
            return
        if callable(self._secret) and self._secret(key_id) is None:
            # its key went (the link ended) while the handshake ran: that key's revoke has
            # already happened and would miss this connection. No await from here to the
            # adoption, so a later drop of the key revokes it.
            log.info("dxl: tcp data server: a connection's link ended during its handshake")
            conn.close()
            return
        fd = conn.detach()
        rc = _ffi.lib.dxl_tcp_server_adopt(self._native, fd, key_tag(key_id))
        if rc < 0:
            err = _ffi.lib.dxl_last_errno()
            os.close(fd)
            if rc == _ffi.lib.DXL_E_LIMIT:  # a peer opening connections without end
                self._warn.warning(
                    "adopt-limit",
                    "dxl: tcp data server refused a connection from %s: it holds %d connections "
                    "in all or %d with that connection's key already",
                    peer,
                    _ffi.lib.DXL_TCP_MAX_CONNS,
                    _ffi.lib.DXL_TCP_MAX_CONNS_PER_TAG,
                )
            else:
                self._warn.warning(
                    "adopt",
                    "dxl: tcp data server could not adopt a connection from %s: %s",
                    peer,
                    _ffi.NativeError(rc, "adopt", err),
                )

    def stats(self) -> dict[str, int]:
        """The native server's counters (see ``dxl_tcp_server_stats_t``), plus handshake
        failures."""
        out = _ffi.ffi.new("dxl_tcp_server_stats_t *")
        if self._native is not None:
            _ffi.lib.dxl_tcp_server_stats(self._native, out)
        fields = (
            "conns_adopted",
            "conns_live",
            "conns_dropped",
            "requests_served",
            "requests_rejected",
            "bytes_sent",
            "bytes_received",
            "requests_aborted",
            "conns_revoked",
            "conns_refused",
            "buffer_bytes",
        )
        result = {name: int(getattr(out, name)) for name in fields}
        result["auth_failures"] = self.auth_failures
        return result

    def revoke(self, key_id: bytes) -> int:
        """Cut every connection that authenticated with ``key_id``: none starts another request
        from now on, and each is closed at once (a request already touching memory may finish
        first; see ``dxl_tcp_server_revoke``). Does not block. Connections with that key are
        refused from now on only if the key lookup no longer knows it: drop the key first.
        Returns how many connections were revoked."""
        if self._native is None:
            return 0
        out = _ffi.ffi.new("uint64_t *")
        _ffi.check(_ffi.lib.dxl_tcp_server_revoke(self._native, key_tag(key_id), out), "tcp revoke")
        return int(out[0])

    def fence(self, timeout_ms: int) -> int:
        """Blocking: wait until no request that was touching memory when called still does
        (requests still running after ``timeout_ms`` have their connections closed). Call after
        removing regions from its registry and before the memory may be freed; run it on an
        executor.
        Returns how many connections were cut off."""
        if self._native is None:
            return 0
        out = _ffi.ffi.new("uint64_t *")
        _ffi.check(_ffi.lib.dxl_tcp_server_fence(self._native, timeout_ms, out), "tcp fence")
        return int(out[0])

    async def close(self) -> None:
        """Stop accepting, drop handshakes in progress, stop the native server (its threads are
        joined and every adopted connection is closed)."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        pending = self._pending.cancel_all()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
        native, self._native = self._native, None
        if native is not None:
            _ffi.lib.dxl_tcp_server_stop(native)
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.detach()  # the server no longer reads it
        self._warn.flush()  # the counts of warnings suppressed since the last window
