"""The link handshake, on both sides.

A link starts with the HMAC handshake of :mod:`dxl.control.auth` on the control connection
(skipped by agreement when neither side has a secret), then ``hello``/``welcome`` frames that
carry identities, registries and the data-server port. Each side then opens its transport to the
other and proves it (:mod:`dxl.transport.select`); a successful handshake becomes a link in the
:class:`~dxl.engine.links.LinkTable`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from ..config import EngineOptions
from ..control import wire
from ..control.auth import AuthError, authenticate_streams
from ..control.channel import read_message
from ..control.hello import PeerInfo
from ..errors import LLMException, LLMStatusCode, status_from_code
from ..transport import Transport, host_identity
from ..transport.select import OpenContext, open_transport
from ..types import LLMClusterInfo
from .book import CacheBook
from .links import LinkTable
from .mover import Mover
from .state import Identity, RunState

log = logging.getLogger("dxl")

HANDSHAKE_TIMEOUT_S = 5.0  # a connection that says nothing valid this long is dropped


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
        pool: Callable[[], list[int]],
    ) -> None:
        self._identity = identity
        self._opts = options
        self._state = state
        self._book = book
        self._links = links
        self._mover = mover
        self._data_port = data_port
        self._pool = pool

    # ------------------------------------------------------------------ client side
    async def connect(self, info: LLMClusterInfo, timeout_s: float) -> LLMStatusCode:
        """Link to the peer ``info`` names; failures are returned (and logged), not raised."""
        peer_id = info.remote_cluster_id
        assert peer_id is not None  # checked by link_clusters
        if peer_id == self._identity.cluster_id:
            log.error("dxl: link_clusters: cluster %d cannot link to itself", peer_id)
            return LLMStatusCode.LLM_PARAM_INVALID
        if self._links.get(peer_id) is not None:
            return LLMStatusCode.LLM_ALREADY_LINK
        if peer_id in self._links.linking:
            return LLMStatusCode.LLM_PROCESSING_LINK
        if len(info.remote_ip_info_list) != 1:
            log.error("dxl: link_clusters: cluster %d needs exactly one remote ip", peer_id)
            return LLMStatusCode.LLM_PARAM_INVALID
        ip, port = info.remote_endpoint()
        self._links.linking.add(peer_id)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(ip, port)
                await authenticate_streams(
                    reader,
                    writer,
                    self._opts.auth_token,
                    role="client",
                    purpose="link",
                    timeout=timeout_s,
                )
                async with self._book.lock:
                    writer.write(self._hello(peer_id))
                    msg = await read_message(reader)
                    if msg["t"] == "reject":
                        log.error(
                            "dxl: link to cluster %d at %s:%d rejected by the peer: %s",
                            peer_id, ip, port, msg["message"],
                        )  # fmt: skip
                        return status_from_code(msg["code"], LLMStatusCode.LLM_LINK_FAILED)
                    if msg["t"] != "welcome":
                        raise wire.FrameError(f"expected welcome, got {msg['t']}")
                    peer = PeerInfo.from_wire(msg, ip)
                    if peer.cluster_id != peer_id:
                        log.error(
                            "dxl: %s:%d is cluster %d, not the cluster %d asked for",
                            ip, port, peer.cluster_id, peer_id,
                        )  # fmt: skip
                        return LLMStatusCode.LLM_LINK_FAILED
                    transport = await self._open_transport(peer)
                    self._links.add(peer, reader, writer, transport, msg["caches"], initiator=True)
                    writer = None
        except TimeoutError:
            log.error("dxl: link to cluster %d at %s:%d timed out", peer_id, ip, port)
            return LLMStatusCode.LLM_LINK_FAILED
        except AuthError as exc:
            log.error(
                "dxl: link to cluster %d at %s:%d not authenticated: %s", peer_id, ip, port, exc
            )
            return LLMStatusCode.LLM_LINK_FAILED
        except (OSError, asyncio.IncompleteReadError, wire.FrameError) as exc:
            log.error("dxl: link to cluster %d at %s:%d failed: %s", peer_id, ip, port, exc)
            return LLMStatusCode.LLM_LINK_FAILED
        except LLMException as exc:
            log.error("dxl: link to cluster %d at %s:%d failed: %s", peer_id, ip, port, exc)
            return exc.status_code
        finally:
            self._links.linking.discard(peer_id)
            if writer is not None:
                writer.close()
        return LLMStatusCode.LLM_SUCCESS

    def _hello(self, expect_cluster_id: int) -> bytes:
        # force: we hold no link to it, so any link it holds to us is stale
        return wire.encode(
            "hello", expect_cluster_id=expect_cluster_id, force=True, **self._about_us()
        )

    def _about_us(self) -> dict[str, Any]:
        """What this engine says about itself in hello and welcome."""
        return {
            "proto": wire.PROTOCOL_VERSION,
            "cluster_id": self._identity.cluster_id,
            "role": int(self._identity.role),
            "incarnation": self._identity.incarnation,
            "host": host_identity(),
            "pid": os.getpid(),
            "probe": self._identity.probe_wire,
            "data_port": self._data_port(),
            "pool": self._pool(),
            "heartbeat_ms": self._opts.heartbeat_interval_ms,
            "caches": self._book.advertised(),
        }

    # ------------------------------------------------------------------ server side
    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Server side of the handshake. Garbage, silence or a wrong secret closes this
        connection only."""
        host = writer.get_extra_info("peername", ("", 0))[0]
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await authenticate_streams(
                    reader,
                    writer,
                    self._opts.auth_token,
                    role="server",
                    purpose="link",
                    timeout=HANDSHAKE_TIMEOUT_S,
                )
                msg = await read_message(reader)
            if msg["t"] != "hello":
                raise wire.FrameError(f"expected hello, got {msg['t']}")
            peer = PeerInfo.from_wire(msg, host)
            code, why = self._check_hello(msg, peer)
            transport: Transport | None = None
            if code == LLMStatusCode.LLM_SUCCESS:
                try:
                    transport = await self._open_transport(peer)
                except LLMException as exc:
                    code, why = exc.status_code, str(exc)
            if transport is None:
                log.error("dxl: refused link from cluster %d: %s", peer.cluster_id, why)
                writer.write(wire.encode("reject", code=int(code), message=why))
                await writer.drain()
                writer.close()
                return
            old = self._links.get(peer.cluster_id)
            if old is not None:  # the peer restarted or lost its end: drop our stale one
                old.close("peer re-linked")
            writer.write(wire.encode("welcome", **self._about_us()))
            self._links.add(peer, reader, writer, transport, msg["caches"], initiator=False)
        except AuthError as exc:
            log.warning("dxl: refused an unauthenticated connection from %s: %s", host, exc)
            writer.close()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, wire.FrameError) as exc:
            log.warning("dxl: dropped an incoming connection: %s", exc or type(exc).__name__)
            writer.close()

    def _check_hello(self, msg: dict[str, Any], peer: PeerInfo) -> tuple[LLMStatusCode, str]:
        if not self._state.running:
            return LLMStatusCode.LLM_LINK_FAILED, "engine is closing"
        if msg["proto"] != wire.PROTOCOL_VERSION:
            return (
                LLMStatusCode.LLM_LINK_FAILED,
                f"protocol {msg['proto']} != {wire.PROTOCOL_VERSION}",
            )
        me = self._identity.cluster_id
        if msg["expect_cluster_id"] != me:
            return LLMStatusCode.LLM_LINK_FAILED, (
                f"the client asked for cluster {msg['expect_cluster_id']} but this is cluster "
                f"{me} (LLMClusterInfo.remote_cluster_id must match the peer)"
            )
        if peer.cluster_id == me:
            return LLMStatusCode.LLM_LINK_FAILED, f"peer uses this engine's cluster id {me}"
        if peer.cluster_id in self._links.linking:
            return LLMStatusCode.LLM_PROCESSING_LINK, "a link to that cluster is being set up"
        if not msg["force"] and self._links.get(peer.cluster_id) is not None:
            return LLMStatusCode.LLM_ALREADY_LINK, f"cluster {peer.cluster_id} is already linked"
        return LLMStatusCode.LLM_SUCCESS, ""

    async def _open_transport(self, peer: PeerInfo) -> Transport:
        ctx = OpenContext(
            cluster_id=self._identity.cluster_id,
            secret=self._opts.auth_token,
            threads=self._opts.transfer_threads,
            timeout_ms=self._opts.sync_kv_timeout_ms,
            run=self._mover.run,
        )
        return await open_transport(peer, self._opts.transport, ctx)
