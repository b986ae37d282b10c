"""An engine's listening side: the control listener links arrive on, and the tcp data server on
the same address that serves its remotely accessible memory (the engine's own region registry,
nothing else) to peers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..config import EngineOptions
from ..control.auth import KeyLookup
from ..errors import LLMStatusCode, fail, param_invalid
from ..memory.regions import RegionRegistry
from ..transport.tcp import is_loopback
from ..transport.tcp_server import DataServer
from .mover import Mover
from .state import Identity

log = logging.getLogger("dxl")

AcceptHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Listener:
    """Accepts links (``on_accept`` runs the server side of the handshake) and serves data."""

    def __init__(
        self, identity: Identity, options: EngineOptions, mover: Mover, regions: RegionRegistry
    ) -> None:
        self._identity = identity
        self._opts = options
        self._mover = mover
        self._regions = regions
        self._server: asyncio.Server | None = None
        self.data: DataServer | None = None
        self._probe_region = 0

    @property
    def address(self) -> tuple[str, int] | None:
        """The (ip, port) links arrive on, with the real port when 0 was asked."""
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def data_ip(self) -> str:
        """The IP the data server listens on, "" when not listening."""
        return str(self.data.address[0]) if self.data is not None else ""

    @property
    def data_port(self) -> int:
        """The data server's port, 0 when not listening (peers then cannot use tcp to us)."""
        return self.data.address[1] if self.data is not None else 0

    async def start(
        self, op: str, listen: tuple[str, int], on_accept: AcceptHandler, keys: KeyLookup
    ) -> None:
        """Accept links on ``listen`` (each connection goes to ``on_accept``) and serve our
        memory to tcp peers on the same address, to connections that authenticate with the
        key of a live link (``keys``). Errors name ``op``, the call that asked to listen."""
        ip, port = listen
        secret = self._opts.auth_token
        if not is_loopback(ip) and secret is None and not self._opts.allow_remote_listen:
            raise param_invalid(
                op,
                f"refusing to listen on {ip} without a shared secret: set LLMConfig.auth_token "
                "(or DXL_AUTH_TOKEN), or LLMConfig.allow_remote_listen=True if the network is "
                "trusted",
            )
        try:
            self._server = await asyncio.start_server(on_accept, ip, port)
            self.data = await DataServer.start(
                ip,
                0,
                keys,
                registry=self._regions,
                instance=self._identity.incarnation,
                allow_insecure=True,
            )
        except OSError as exc:
            await self.stop()
            raise fail(
                op,
                LLMStatusCode.LLM_FAILED,
                f"cannot listen on {ip}:{port}: {exc.strerror or exc}",
            ) from exc
        # the probe must be servable over tcp, like any remotely accessible memory
        self._probe_region = self._regions.add(int(self._identity.probe.ctypes.data), 8)
        assert self.address is not None
        log.info(
            "dxl: cluster %d listening on %s:%d (data port %d, %s)",
            self._identity.cluster_id,
            *self.address,
            self.data_port,
            "authenticated" if secret else "no shared secret",
        )

    def stop_accepting(self) -> None:
        """No new links (the engine is closing); the data server goes on serving."""
        if self._server is not None:
            self._server.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self.data is not None:
            await self.data.close()
            self.data = None
        if self._probe_region:
            self._regions.remove(self._probe_region)
            self._probe_region = 0

    def revoke(self, key_id: bytes) -> None:
        """A link's data key went: cut the data connections that authenticated with it."""
        if self.data is not None:
            self.data.revoke(key_id)

    async def fence(self) -> None:
        """After regions were removed: wait until no tcp request still touches them."""
        if self.data is not None:
            await self._mover.run(self.data.fence, self._opts.sync_kv_timeout_ms)

    def stats(self) -> dict[str, Any] | None:
        return self.data.stats() if self.data is not None else None
