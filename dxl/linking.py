"""Listening, the link handshake and the choice of transport (a mixin of the Engine).

A link starts with the HMAC handshake of :mod:`dxl.auth` on the control connection (skipped
by agreement when neither side has a secret), then ``hello``/``welcome`` frames that carry
identities, registries and the data-server port. Each side then opens its transport to the
other and proves it by reading the peer's 8-byte probe through it:

- ``cma`` when both engines share a kernel and pid namespace (and the kernel lets us attach);
- ``tcp`` otherwise (or when forced), to the peer's native data server;
- none when the peer has no data server and CMA is impossible: that side cannot reach the
  peer's memory, though the peer can still pull from and push to it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _ffi, args, wire
from .auth import AuthError, authenticate_streams
from .control import read_message
from .errors import LLMException, LLMStatusCode
from .link import Link, PeerInfo
from .plan import Pieces
from .registry import RemoteCache
from .tcp import DataServer, TcpTransport, _is_loopback
from .transport import CmaTransport, Transport, Unreachable, host_identity

if TYPE_CHECKING:
    from .types import LLMClusterInfo

log = logging.getLogger("dxl")
Status = LLMStatusCode

HANDSHAKE_TIMEOUT_S = 5.0  # a connection that says nothing valid this long is dropped


class LinkSetup:
    """Listener, data server, handshake and transport choice; relies on the Engine core."""

    _server: asyncio.Server | None
    _data: DataServer | None

    # ------------------------------------------------------------------ listening
    async def _listen(self, listen: tuple[str, int]) -> None:
        """Accept links on ``listen`` and serve our memory to tcp peers on the same address."""
        ip, port = listen
        secret = self._opts.auth_token
        if not _is_loopback(ip) and secret is None and not self._opts.allow_remote_listen:
            raise args.param_invalid(
                "init",
                f"refusing to listen on {ip} without a shared secret: set LLMConfig.auth_token "
                "(or DXL_AUTH_TOKEN), or LLMConfig.allow_remote_listen=True if the network is "
                "trusted",
            )
        try:
            self._server = await asyncio.start_server(self._on_accept, ip, port)
            self._data = await DataServer.start(
                ip, 0, secret, instance=self.incarnation, allow_insecure=True
            )
        except OSError as exc:
            await self._stop_listening()
            raise args.fail(
                "init", Status.LLM_FAILED, f"cannot listen on {ip}:{port}: {exc.strerror or exc}"
            ) from None
        # the probe must be servable over tcp, like any remotely accessible memory
        out = _ffi.ffi.new("uint64_t *")
        _ffi.check(_ffi.lib.dxl_region_add(int(self._probe.ctypes.data), 8, out), "probe region")
        self._probe_region = int(out[0])
        log.info(
            "dxl: cluster %d listening on %s:%d (data port %d, %s)",
            self._cluster_id, *self.listen_address, self._data.address[1],
            "authenticated" if secret else "no shared secret",
        )

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._data is not None:
            await self._data.close()
            self._data = None
        if getattr(self, "_probe_region", None):
            _ffi.lib.dxl_region_remove(self._probe_region)
            self._probe_region = 0

    async def _fence_data_server(self) -> None:
        """After regions were removed: wait until no tcp request still touches them."""
        if self._data is not None:
            await self._run_native(self._data.fence, self._opts.sync_kv_timeout_ms)

    # ------------------------------------------------------------------ client side
    async def _link_one(self, info: LLMClusterInfo, timeout_s: float) -> LLMStatusCode:
        peer_id = info.remote_cluster_id
        if peer_id == self._cluster_id:
            log.error("dxl: link_clusters: cluster %d cannot link to itself", peer_id)
            return Status.LLM_PARAM_INVALID
        if peer_id in self._links:
            return Status.LLM_ALREADY_LINK
        if peer_id in self._linking:
            return Status.LLM_PROCESSING_LINK
        if len(info.remote_ip_info_list) != 1:
            log.error("dxl: link_clusters: cluster %d needs exactly one remote ip", peer_id)
            return Status.LLM_PARAM_INVALID
        ip, port = info.remote_endpoint()
        self._linking.add(peer_id)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(ip, port)
                await authenticate_streams(
                    reader, writer, self._opts.auth_token, role="client", purpose="link",
                    timeout=timeout_s,
                )
                async with self._registry_lock:
                    writer.write(self._hello(peer_id))
                    msg = await read_message(reader)
                    if msg["t"] == "reject":
                        log.error(
                            "dxl: link to cluster %d at %s:%d rejected by the peer: %s",
                            peer_id, ip, port, msg["message"],
                        )
                        return _status(msg["code"], Status.LLM_LINK_FAILED)
                    if msg["t"] != "welcome":
                        raise wire.FrameError(f"expected welcome, got {msg['t']}")
                    peer = PeerInfo.from_wire(msg, ip)
                    if peer.cluster_id != peer_id:
                        log.error(
                            "dxl: %s:%d is cluster %d, not the cluster %d asked for",
                            ip, port, peer.cluster_id, peer_id,
                        )
                        return Status.LLM_LINK_FAILED
                    transport = await self._open_transport(peer)
                    self._add_link(peer, reader, writer, transport, msg["caches"], initiator=True)
                    writer = None
        except TimeoutError:
            log.error("dxl: link to cluster %d at %s:%d timed out", peer_id, ip, port)
            return Status.LLM_LINK_FAILED
        except AuthError as exc:
            log.error("dxl: link to cluster %d at %s:%d not authenticated: %s",
                      peer_id, ip, port, exc)
            return Status.LLM_LINK_FAILED
        except (OSError, asyncio.IncompleteReadError, wire.FrameError) as exc:
            log.error("dxl: link to cluster %d at %s:%d failed: %s", peer_id, ip, port, exc)
            return Status.LLM_LINK_FAILED
        except LLMException as exc:
            log.error("dxl: link to cluster %d at %s:%d failed: %s", peer_id, ip, port, exc)
            return exc.status_code
        finally:
            self._linking.discard(peer_id)
            if writer is not None:
                writer.close()
        return Status.LLM_SUCCESS

    def _identity(self) -> dict[str, Any]:
        """What this engine says about itself in hello and welcome."""
        return {
            "proto": wire.PROTOCOL_VERSION,
            "cluster_id": self._cluster_id,
            "role": int(self._role),
            "incarnation": self.incarnation,
            "host": host_identity(),
            "pid": os.getpid(),
            "probe": [int(self._probe.ctypes.data), int(self._probe[0])],
            "data_port": self._data.address[1] if self._data is not None else 0,
            "pool": (
                [self._host_pool.fd, self._host_pool.base, self._host_pool.size]
                if self._host_pool is not None
                else []
            ),
            "caches": self._advertised(),
        }

    def _hello(self, expect_cluster_id: int) -> bytes:
        # force: we hold no link to it, so any link it holds to us is stale
        return wire.encode(
            "hello", expect_cluster_id=expect_cluster_id, force=True, **self._identity()
        )

    # ------------------------------------------------------------------ server side
    async def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Server side of the handshake. Garbage, silence or a wrong secret closes this
        connection only."""
        host = writer.get_extra_info("peername", ("", 0))[0]
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await authenticate_streams(
                    reader, writer, self._opts.auth_token, role="server", purpose="link",
                    timeout=HANDSHAKE_TIMEOUT_S,
                )
                msg = await read_message(reader)
            if msg["t"] != "hello":
                raise wire.FrameError(f"expected hello, got {msg['t']}")
            peer = PeerInfo.from_wire(msg, host)
            code, why = self._check_hello(msg, peer)
            if code == Status.LLM_SUCCESS:
                try:
                    transport = await self._open_transport(peer)
                except LLMException as exc:
                    code, why = exc.status_code, str(exc)
            if code != Status.LLM_SUCCESS:
                log.error("dxl: refused link from cluster %d: %s", peer.cluster_id, why)
                writer.write(wire.encode("reject", code=int(code), message=why))
                await writer.drain()
                writer.close()
                return
            old = self._links.get(peer.cluster_id)
            if old is not None:  # the peer restarted or lost its end: drop our stale one
                old.channel.close("peer re-linked")
            writer.write(wire.encode("welcome", **self._identity()))
            self._add_link(peer, reader, writer, transport, msg["caches"], initiator=False)
        except AuthError as exc:
            log.warning("dxl: refused an unauthenticated connection from %s: %s", host, exc)
            writer.close()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, wire.FrameError) as exc:
            log.warning("dxl: dropped an incoming connection: %s", exc or type(exc).__name__)
            writer.close()

    def _check_hello(self, msg: dict[str, Any], peer: PeerInfo) -> tuple[LLMStatusCode, str]:
        if self._state != "running":
            return Status.LLM_LINK_FAILED, "engine is closing"
        if msg["proto"] != wire.PROTOCOL_VERSION:
            return Status.LLM_LINK_FAILED, f"protocol {msg['proto']} != {wire.PROTOCOL_VERSION}"
        if msg["expect_cluster_id"] != self._cluster_id:
            return Status.LLM_LINK_FAILED, (
                f"the client asked for cluster {msg['expect_cluster_id']} but this is cluster "
                f"{self._cluster_id} (LLMClusterInfo.remote_cluster_id must match the peer)"
            )
        if peer.cluster_id == self._cluster_id:
            return Status.LLM_LINK_FAILED, f"peer uses this engine's cluster id {peer.cluster_id}"
        if peer.cluster_id in self._linking:
            return Status.LLM_PROCESSING_LINK, "a link to that cluster is being set up"
        if not msg["force"] and peer.cluster_id in self._links:
            return Status.LLM_ALREADY_LINK, f"cluster {peer.cluster_id} is already linked"
        return Status.LLM_SUCCESS, ""

    # ------------------------------------------------------------------ transports
    async def _open_transport(self, peer: PeerInfo) -> Transport:
        """Pick the transport to a peer (``dxl.Transport``: auto, cma or tcp) and prove it by
        reading the peer's probe through it."""
        choice = self._opts.transport
        same_host = peer.host == host_identity()
        if choice == "cma" and not same_host:
            raise _link_failed(
                f"transport cma was asked for, but cluster {peer.cluster_id} runs on another "
                "host or pid namespace"
            )
        errors = []
        if choice in ("auto", "cma") and same_host:
            try:
                cma = await self._proven(peer, CmaTransport(peer.pid, self._opts.transfer_threads))
                self._map_peer_pool(peer, cma)
                return cma
            except (_ffi.NativeError, LLMException) as exc:
                if choice == "cma":
                    raise _link_failed(f"cma to cluster {peer.cluster_id} failed: {exc}") from None
                errors.append(f"cma: {exc}")
        if peer.data_port:
            try:
                transport = await self._run_native(functools.partial(
                    TcpTransport,
                    (peer.address, peer.data_port),
                    self._opts.auth_token,
                    expect_instance=peer.incarnation,
                    timeout_ms=self._opts.sync_kv_timeout_ms,
                ))
                return await self._proven(peer, transport)
            except (_ffi.NativeError, AuthError, LLMException, OSError) as exc:
                raise _link_failed(
                    f"tcp to cluster {peer.cluster_id} at {peer.address}:{peer.data_port} "
                    f"failed: {exc}" + (f" (and {errors[0]})" if errors else "")
                ) from None
        reason = (
            f"cluster {peer.cluster_id} does not listen, so it has no data server"
            + (f" ({errors[0]})" if errors else "")
        )
        log.info("dxl: %s; it can still pull from and push to cluster %d", reason,
                 self._cluster_id)
        return Unreachable(reason)

    def _map_peer_pool(self, peer: PeerInfo, cma: Transport) -> None:
        """Map the peer's memfd pool, so pulls from caches it allocated are plain memcpy."""
        if peer.pool is None or not isinstance(cma, CmaTransport):
            return
        fd, base, size = peer.pool
        try:
            cma.map_shared("pool", [(fd, 0, base, size, None)])
        except OSError as exc:  # still correct over cma, only slower
            log.info("dxl: cannot map the pool of cluster %d: %s", peer.cluster_id, exc)
            return
        self._spawn(self._prefault(cma, "pool"))

    def _map_shared(self, link: Link, cache: RemoteCache) -> None:
        """Map the memfd windows a same-host peer shares for one of its caches
        (``dxl.ShareRegistered`` on its side), so pieces inside them are plain memcpy."""
        transport = link.transport
        if not cache.shm or not isinstance(transport, CmaTransport):
            return
        if transport.has_shared(cache.cache_id):  # a new version of the same registration
            return
        try:
            transport.map_shared(cache.cache_id, cache.shm)
        except OSError as exc:  # still correct over cma, only slower
            log.info(
                "dxl: cannot map cache %d of cluster %d: %s",
                cache.cache_id, link.peer.cluster_id, exc,
            )
            return
        self._spawn(self._prefault(transport, cache.cache_id))

    async def _prefault(self, transport: CmaTransport, key: Any) -> None:
        """Fault a fresh mapping's pages in, in the background, 64 MiB per executor job (so
        transfers interleave): otherwise the first copy through it pays a page fault per 4 KiB
        page, 4-5x slower. Stops when the mapping goes."""
        for addr, length in transport.shared_chunks(key):
            if not await self._run_native(transport.prefault, key, addr, length):
                return

    async def _proven(self, peer: PeerInfo, transport: Transport) -> Transport:
        """Read the peer's probe through ``transport``; the token proves the right process."""
        got = np.zeros(1, dtype=np.uint64)
        addr, token = peer.probe
        probe = Pieces(
            np.array([got.ctypes.data], dtype=np.uint64),
            np.array([addr], dtype=np.uint64),
            np.array([8], dtype=np.uint64),
        )
        try:
            await self._run_native(transport.read, probe)
        except BaseException:
            transport.close()
            raise
        if int(got[0]) != token:
            transport.close()
            raise _link_failed(
                f"the {transport.name} peer is not the process of cluster {peer.cluster_id} "
                "(probe mismatch)"
            )
        return transport


def _link_failed(message: str) -> LLMException:
    return args.fail("link_clusters", Status.LLM_LINK_FAILED, message)


def _status(code: int, default: LLMStatusCode) -> LLMStatusCode:
    try:
        return LLMStatusCode(code)
    except ValueError:
        return default
