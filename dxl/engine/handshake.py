"""The link handshake, on both sides.

On a new control connection both sides first run the HMAC handshake of :mod:`dxl.control.auth`
(skipped by agreement when neither has a secret: then the peer must be a process of the same user
on this host, as the kernel reports it, unless ``allow_remote_listen`` says the network is
trusted). Then::

    client                                   server
    hello   (identity, challenge)    ->      checks it; a live link the peer set up before is
                                             replaced only if it no longer answers a probe
            <-    welcome (identity, challenge)
    both derive the link's data key from the two challenges (and the secret)
    opens its transport, proves it
    ready   (its caches)             ->      opens its transport, proves it
            <-    ready (its caches)         link up (the caches it sent and the link's entry
    link up                                  in the table are made in one step)

A peer's declared pid counts only once the kernel shows that process holds the other end of
this connection (:mod:`dxl.control.peercred`), and never when it is this process: otherwise no
same-host transport is used towards it. Everything is bounded: the client's ``link_clusters``
timeout, the server's pre-authentication and handshake deadlines, the size of frames before a
link exists, and the number of handshakes in progress (the oldest is shed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..config import EngineOptions
from ..control import wire
from ..control.auth import AuthError, authenticate_streams, link_key
from ..control.channel import read_message
from ..control.hello import PeerInfo
from ..control.messages import DataInfo, Hello, Message, Ready, Reject, Welcome
from ..control.peercred import PeerSocket, holds_socket, peer_socket
from ..errors import DxlError, LLMException, LLMStatusCode, fail, status_from_code
from ..guard import PendingCap, RateLimitedLog
from ..transport import Transport, host_identity
from ..transport.names import NIXL
from ..transport.nixl import NixlHost
from ..transport.select import OpenContext, TransportBackend, open_transport
from ..types import LLMClusterInfo
from .book import CacheBook
from .links import LinkTable
from .mover import Mover
from .state import Identity, RunState

log = logging.getLogger("dxl")
limited = RateLimitedLog(log)

PREAUTH_TIMEOUT_S = 2.0  # a new connection must authenticate and say hello this fast
HANDSHAKE_TIMEOUT_S = 5.0  # and complete the whole handshake (transports included) this fast
MAX_PENDING = 32  # handshakes in progress on the server side; the oldest is shed
PROBE_TIMEOUT_S = 1.0  # a live link that does not answer this fast may be replaced

Code = LLMStatusCode
M = TypeVar("M", bound=Message)


class Refused(Exception):
    """This side refuses the link: the status to return, and why (sent as a reject)."""

    def __init__(self, code: LLMStatusCode, why: str) -> None:
        super().__init__(why)
        self.code = code


class Handshake:
    """Sets links up: :meth:`connect` (we called ``link_clusters``) and :meth:`accept` (a peer
    connected to our listener)."""

    def __init__(
        self,
        identity: Identity,
        options: EngineOptions,
        state: RunState,
        book: CacheBook,
        links: LinkTable,
        mover: Mover,
        data_port: Callable[[], int],
        data_ip: Callable[[], str],
        pool: Callable[[], list[int]],
        backend: TransportBackend | None = None,
        nixl: NixlHost | None = None,
    ) -> None:
        self._identity = identity
        self._backend = backend  # injected: it opens every transport (tests)
        self._opts = options
        self._state = state
        self._book = book
        self._links = links
        self._mover = mover
        self._data_port = data_port
        self._data_ip = data_ip
        self._pool = pool
        self._nixl = nixl
        self._pending = PendingCap(MAX_PENDING)

    async def close(self) -> None:
        """Stop accepting handshakes: those in progress are cancelled."""
        tasks = self._pending.cancel_all()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ client side
    async def connect(
        self, info: LLMClusterInfo, timeout_s: float, *, quiet: bool = False
    ) -> LLMStatusCode:
        """Link to the peer ``info`` names; failures are returned (and logged, at debug level
        when ``quiet``: a caller that retries), not raised."""
        peer_id = info.remote_cluster_id
        assert peer_id is not None  # checked by link_clusters
        if peer_id == self._identity.cluster_id:
            log.error("dxl: link_clusters: cluster %d cannot link to itself", peer_id)
            return Code.LLM_PARAM_INVALID
        own = self._links.own(peer_id)
        if own is not None and not own.closed:
            return Code.LLM_ALREADY_LINK
        if peer_id in self._links.linking:
            return Code.LLM_PROCESSING_LINK
        if len(info.remote_ip_info_list) != 1:
            log.error("dxl: link_clusters: cluster %d needs exactly one remote ip", peer_id)
            return Code.LLM_PARAM_INVALID
        ip, port = info.remote_endpoint()
        where = f"cluster {peer_id} at {ip}:{port}"

        def failed(message: str, *args: object) -> None:
            # a client (tickets naming any endpoint) may make many fail: rate-limited
            if quiet:
                log.debug(message, *args)
            else:
                limited.error("link-failed", message, *args)

        self._links.linking.add(peer_id)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout_s):
                deadline = asyncio.get_running_loop().time() + timeout_s
                reader, writer = await asyncio.open_connection(ip, port)
                await authenticate_streams(
                    reader,
                    writer,
                    self._opts.auth_token,
                    role="client",
                    purpose="link",
                    timeout=timeout_s,
                )
                kernel = self._trusted(writer)
                async with self._book.lock:  # our caches, sent in ready, stay as sent
                    await self._client_steps(reader, writer, peer_id, ip, kernel, deadline)
                    writer = None  # the link owns it now
        except Refused as exc:
            failed("dxl: link to %s refused: %s", where, exc)
            return exc.code
        except TimeoutError:
            failed("dxl: link to %s timed out (%.0f ms)", where, timeout_s * 1000)
            return Code.LLM_LINK_FAILED
        except AuthError as exc:
            failed("dxl: link to %s not authenticated: %s", where, exc)
            return Code.LLM_LINK_FAILED
        except (OSError, asyncio.IncompleteReadError, wire.FrameError) as exc:
            failed("dxl: link to %s failed: %s", where, exc or type(exc).__name__)
            return Code.LLM_LINK_FAILED
        except LLMException as exc:
            failed("dxl: link to %s failed: %s", where, exc)
            return exc.status_code
        finally:
            self._links.linking.discard(peer_id)
            if writer is not None:
                writer.close()
        return Code.LLM_SUCCESS

    async def _client_steps(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_id: int,
        ip: str,
        kernel: PeerSocket | None,
        deadline: float,
    ) -> None:
        challenge = secrets.token_bytes(32)
        writer.write(self._frame("hello", challenge, expect_cluster_id=peer_id))
        msg = await _expect(reader, Welcome, wire.PRELINK_MAX_FRAME)
        peer = PeerInfo.from_wire(msg, ip)
        if peer.cluster_id != peer_id:
            raise Refused(
                Code.LLM_LINK_FAILED,
                f"{ip} is cluster {peer.cluster_id}, not the cluster {peer_id} asked for",
            )
        key_id, key = link_key(self._opts.auth_token, challenge, bytes.fromhex(msg.challenge))
        self._links.add_key(key_id, key)  # the peer's transport may connect from now on
        transport: Transport | None = None
        try:
            try:
                transport = await self._open_transport(peer, kernel, key_id, key, deadline)
            except LLMException as exc:
                writer.write(_reject(exc.status_code, str(exc)))
                raise
            info = transport.local_info()
            if info:  # before ready: the server learns at once that we use such a transport
                writer.write(wire.encode(DataInfo(info=info)))
            writer.write(wire.encode(Ready(caches=self._book.advertised())))
            theirs, ready = await _data_info_then_ready(reader, info, peer_id)
            if theirs is not None:
                await _attach(transport, theirs, deadline)
            self._links.add(peer, reader, writer, transport, ready.caches, True, key_id)
            transport = None
        finally:
            if transport is not None:  # the link did not come up: nothing may use it
                transport.close()
                self._links.drop_key(key_id)

    # ------------------------------------------------------------------ server side
    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Server side of the handshake. Garbage, silence, a stranger or a wrong secret closes
        this connection only; nothing raised here reaches the event loop."""
        task = asyncio.current_task()
        assert task is not None
        self._pending.admit(task)  # sheds the oldest handshake when too many are in progress
        host = str(writer.get_extra_info("peername", ("?", 0))[0])
        try:
            await self._server_steps(reader, writer, host)
        except Refused as exc:
            limited.warning("refused-link", "dxl: refused a link from %s: %s", host, exc)
            writer.write(_reject(exc.code, str(exc)))
            await _drain_quietly(writer)
            writer.close()
        except AuthError as exc:
            limited.warning(
                "auth", "dxl: refused an unauthenticated connection from %s: %s", host, exc
            )
            writer.close()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, wire.FrameError) as exc:
            limited.warning(
                "dropped", "dxl: dropped an incoming connection from %s: %s", host,
                exc or type(exc).__name__,
            )  # fmt: skip
            writer.close()
        except asyncio.CancelledError:  # shed for a newer handshake, or the engine closes
            writer.close()
        except Exception:  # a bug must cost this connection only, never the listener
            log.exception("dxl: link handshake with %s failed", host)
            writer.close()

    async def _server_steps(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDSHAKE_TIMEOUT_S
        async with asyncio.timeout(PREAUTH_TIMEOUT_S):
            await authenticate_streams(
                reader,
                writer,
                self._opts.auth_token,
                role="server",
                purpose="link",
                timeout=PREAUTH_TIMEOUT_S,
            )
            kernel = self._trusted(writer)
            msg = await _expect(reader, Hello, wire.PRELINK_MAX_FRAME)
        peer = PeerInfo.from_wire(msg, host)
        self._check_hello(msg, peer)
        if peer.cluster_id in self._links.accepting:
            raise Refused(Code.LLM_PROCESSING_LINK, "a link from that cluster is being set up")
        self._links.accepting.add(peer.cluster_id)
        transport: Transport | None = None
        key_id = b""
        linked = False
        try:
            # a live link the peer set up before stays: no stranger may evict it, and the peer
            # itself holds it still; one that no longer answers is replaced
            stale = self._links.theirs(peer.cluster_id)
            if stale is not None and await self._links.alive(stale, PROBE_TIMEOUT_S):
                raise Refused(Code.LLM_ALREADY_LINK, f"cluster {peer.cluster_id} is already linked")
            async with asyncio.timeout_at(deadline):
                challenge = secrets.token_bytes(32)
                key_id, key = link_key(
                    self._opts.auth_token, bytes.fromhex(msg.challenge), challenge
                )
                self._links.add_key(key_id, key)
                writer.write(self._frame("welcome", challenge))
                first = await _expect(reader, Message, wire.MAX_FRAME)
                wants = self._opts.transport == NIXL  # the one transport with a data_info
                if isinstance(first, DataInfo) != wants:
                    raise Refused(Code.LLM_LINK_FAILED, _mismatch(wants, peer.cluster_id))
                ready = await _expect(reader, Ready, wire.MAX_FRAME) if wants else first
                if not isinstance(ready, Ready):
                    raise wire.FrameError(f"expected ready, got {ready.KIND}")
                transport = await self._open_transport(peer, kernel, key_id, key, deadline)
                info = transport.local_info()
                if isinstance(first, DataInfo):
                    await _attach(transport, first.info, deadline)
            if stale is not None:  # it did not answer: the peer restarted or lost its end
                stale.close("the peer set up a new link")
            # one step: the caches we announce and the link that will hear of later changes
            if info:
                writer.write(wire.encode(DataInfo(info=info)))
            writer.write(wire.encode(Ready(caches=self._book.advertised())))
            self._links.add(peer, reader, writer, transport, ready.caches, False, key_id)
            linked = True
        except LLMException as exc:
            raise Refused(exc.status_code, str(exc)) from exc
        finally:
            self._links.accepting.discard(peer.cluster_id)
            if not linked:  # nothing may use what this setup opened
                if transport is not None:
                    transport.close()
                if key_id:
                    self._links.drop_key(key_id)

    def _check_hello(self, msg: Hello, peer: PeerInfo) -> None:
        if not self._state.running:
            raise Refused(Code.LLM_LINK_FAILED, "engine is closing")
        if msg.proto != wire.PROTOCOL_VERSION:
            raise Refused(Code.LLM_LINK_FAILED, f"protocol {msg.proto} != {wire.PROTOCOL_VERSION}")
        me = self._identity.cluster_id
        if msg.expect_cluster_id != me:
            raise Refused(
                Code.LLM_LINK_FAILED,
                f"the client asked for cluster {msg.expect_cluster_id} but this is cluster "
                f"{me} (LLMClusterInfo.remote_cluster_id must match the peer)",
            )
        if peer.cluster_id == me:
            raise Refused(Code.LLM_LINK_FAILED, f"peer uses this engine's cluster id {me}")

    # ------------------------------------------------------------------ both sides
    def _trusted(self, writer: asyncio.StreamWriter) -> PeerSocket | None:
        """The kernel's view of the peer's socket (None: not on this host). Without a shared
        secret only a process of our own user on this host may link, unless the network is
        declared trusted (``allow_remote_listen``)."""
        sock: socket.socket | None = writer.get_extra_info("socket")
        kernel = peer_socket(sock) if sock is not None else None
        if self._opts.auth_token is None and not self._opts.allow_remote_listen:
            if kernel is None:
                raise Refused(
                    Code.LLM_LINK_FAILED,
                    "without a shared secret only processes of this host may link (set "
                    "LLMConfig.auth_token on both sides, or allow_remote_listen on a trusted "
                    "network)",
                )
            if kernel.uid != os.getuid():
                raise Refused(
                    Code.LLM_LINK_FAILED,
                    f"without a shared secret only processes of user {os.getuid()} may link "
                    f"(the peer runs as user {kernel.uid}); set LLMConfig.auth_token",
                )
        return kernel

    def _proven_pid(self, peer: PeerInfo, kernel: PeerSocket | None) -> int:
        """The peer's pid if the kernel shows that process holds the other end of this
        connection and it is not this process; else 0 (no same-host transport to it)."""
        if kernel is None:
            return 0
        if peer.pid == os.getpid():
            log.info("dxl: cluster %d is this very process: no cma to it", peer.cluster_id)
            return 0
        if not holds_socket(peer.pid, kernel.inode):
            limited.warning(
                "pid-proof",
                "dxl: cluster %d says it is pid %d, but that process does not hold the "
                "connection: no same-host transport to it",
                peer.cluster_id,
                peer.pid,
            )
            return 0
        return peer.pid

    async def _open_transport(
        self,
        peer: PeerInfo,
        kernel: PeerSocket | None,
        key_id: bytes,
        key: bytes,
        deadline: float,
    ) -> Transport:
        ctx = OpenContext(
            cluster_id=self._identity.cluster_id,
            pid=self._proven_pid(peer, kernel),
            key_id=key_id,
            key=key,
            threads=self._opts.transfer_threads,
            timeout_ms=self._opts.sync_kv_timeout_ms,
            deadline=deadline,
            nixl=self._nixl,
        )
        return await open_transport(peer, self._opts.transport, ctx, self._backend)

    def _frame(self, kind: str, challenge: bytes, **extra: Any) -> bytes:
        """hello or welcome: what this engine says about itself."""
        return wire.encode(
            kind,
            proto=wire.PROTOCOL_VERSION,
            cluster_id=self._identity.cluster_id,
            role=int(self._identity.role),
            incarnation=self._identity.incarnation,
            host=host_identity(),
            pid=os.getpid(),
            probe=self._identity.probe_wire,
            data_port=self._data_port(),
            data_ip=self._data_ip(),
            pool=self._pool(),
            heartbeat_ms=self._opts.heartbeat_interval_ms,
            challenge=challenge.hex(),
            **extra,
        )


async def _expect(reader: asyncio.StreamReader, kind: type[M], max_frame: int) -> M:
    """The next frame, which must be of ``kind`` (a reject becomes :class:`Refused`)."""
    msg = await read_message(reader, max_frame)
    if isinstance(msg, Reject):
        raise Refused(
            status_from_code(msg.code, Code.LLM_LINK_FAILED),
            f"rejected by the peer: {msg.message}",
        )
    if not isinstance(msg, kind):
        raise wire.FrameError(f"expected {kind.KIND}, got {msg.KIND}")
    return msg


def _mismatch(ours: bool, peer: int) -> str:
    """Why a link whose two ends disagree on the nixl transport is refused."""
    if ours:
        return (
            f"this engine uses the nixl transport (dxl.Transport=nixl) and cluster {peer} does "
            "not: set it on both engines"
        )
    return (
        f"cluster {peer} uses the nixl transport (dxl.Transport=nixl) and this engine does "
        "not: set it on both engines"
    )


async def _data_info_then_ready(
    reader: asyncio.StreamReader, info: str, peer: int
) -> tuple[str | None, Ready]:
    """The server's answer: its ``data_info`` (exactly when ours was sent), then its ready."""
    msg = await _expect(reader, Message, wire.MAX_FRAME)
    if isinstance(msg, DataInfo) != bool(info):
        raise fail("link_clusters", Code.LLM_LINK_FAILED, _mismatch(bool(info), peer))
    if isinstance(msg, DataInfo):
        return msg.info, await _expect(reader, Ready, wire.MAX_FRAME)
    if not isinstance(msg, Ready):
        raise wire.FrameError(f"expected ready, got {msg.KIND}")
    return None, msg


async def _attach(transport: Transport, info: str, deadline: float) -> None:
    """Give the transport the peer's ``data_info`` (blocking, so on a thread of its own, never
    the engine's workers; bounded by the link's deadline, which ``attach`` keeps too)."""
    loop = asyncio.get_running_loop()
    deadline_s = time.monotonic() + (deadline - loop.time())
    try:
        async with asyncio.timeout_at(deadline):
            await asyncio.to_thread(transport.attach, info, deadline_s)
    except DxlError as exc:
        raise fail(
            "link_clusters", Code.LLM_LINK_FAILED, f"{transport.name} did not come up: {exc}"
        ) from exc


def _reject(code: int, why: str) -> bytes:
    return wire.encode(Reject(code=int(code), message=wire.clip(why)))


async def _drain_quietly(writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(0.5):
            await writer.drain()
    except (TimeoutError, OSError):
        pass
