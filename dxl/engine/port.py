"""The engine's extension point for layers above it: what it offers them, and their lifecycle.

A layer (today the request handoff, :mod:`dxl.handoff`) is built by a factory from the
engine's :class:`LayerPort` and registered with :meth:`dxl.engine.Engine.add_layer`; the engine
closes it before its links go and reports its ``stats()`` under its name. The engine imports no
layer: ``dxl.Engine`` (:mod:`dxl.layers`) adds the handoff and types ``engine.handoff``.

The port is deliberately small: identity, run state, our registrations, links (lookup, linking
to an endpoint, message routing, closure), background tasks, one transfer through the mover,
and the data server's write fence. What the handoff needs of it is written down as a Protocol
on its side (:class:`dxl.handoff.port.EnginePort`); mypy checks that this class satisfies it
where ``dxl.Engine`` builds the handoff.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..config import EngineOptions
from ..types import Cache, LLMClusterInfo
from .link import Link
from .linking import LinkOps
from .links import LinkTable, MessageHandler
from .listener import Listener
from .mover import Mover
from .registry import LocalCache, RemoteCache
from .resolve import Resolver, Route
from .state import Identity, RunState
from .transfer import Blocks, Transfer


class Layer(Protocol):
    """What the engine needs of a layer: to close it, and its counters."""

    async def close(self) -> None:
        """Engine shutdown, before the links close: end what the layer holds."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for ``Engine.stats()`` (under the layer's name)."""
        ...


class LayerPort:
    """The engine's services to a layer above it (see the module docstring)."""

    def __init__(
        self,
        identity: Identity,
        options: EngineOptions,
        state: RunState,
        links: LinkTable,
        linking: LinkOps,
        listener: Listener,
        mover: Mover,
        resolver: Resolver,
    ) -> None:
        self._identity = identity
        self._options = options
        self._state = state
        self._links = links
        self._linking = linking
        self._listener = listener
        self._mover = mover
        self._resolver = resolver

    @property
    def cluster_id(self) -> int:
        return self._identity.cluster_id

    @property
    def incarnation(self) -> str:
        return self._identity.incarnation

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return self._listener.address

    @property
    def options(self) -> EngineOptions:
        return self._options

    def require_running(self, op: str) -> None:
        self._state.require(op)

    def local_cache(self, op: str, cache: Cache) -> LocalCache:
        return self._resolver.local(op, cache)

    def live_link(self, cluster_id: int) -> Link | None:
        return self._links.get(cluster_id)

    async def link_endpoint(
        self, cluster_id: int, endpoint: tuple[str, int], timeout_ms: int
    ) -> Link | None:
        info = LLMClusterInfo()
        info.remote_cluster_id = cluster_id
        info.append_local_ip_info("127.0.0.1", 0)  # link_clusters checks one is given; unused
        info.append_remote_ip_info(*endpoint)
        await self._linking.link_clusters([info], timeout_ms)  # failures: no link afterwards
        return self._links.get(cluster_id)

    def on(self, kind: str, handler: MessageHandler) -> None:
        self._links.on(kind, handler)

    def watch_closed(self, watcher: Callable[[Link], None]) -> None:
        self._links.watch_closed(watcher)

    def spawn(self, coro: Awaitable[Any]) -> None:
        self._links.spawn(coro)

    async def transfer(
        self,
        op: str,
        link: Link,
        local: LocalCache,
        remote: RemoteCache,
        pieces: Blocks,
        *,
        write: bool,
    ) -> None:
        route = Route(link, local, [remote])
        await self._mover.move(Transfer(op, route, pieces, write=write, inline=True))

    async def fence_writes(self) -> None:
        await self._listener.fence()
