"""What the request handoff needs of an engine: the one module of :mod:`dxl.handoff` that
imports :mod:`dxl.engine`.

The handoff is a layer above the engine. It is built from an :class:`EnginePort` (the engine
builds one, :class:`dxl.engine.port.LayerPort`, and hands it to each layer it carries) and uses
nothing else of the engine, so a maintainer reads this file to know what the handoff may do to
an engine, and the engine can change everything behind it. The engine does not import the
handoff; ``dxl.Engine`` (:mod:`dxl.layers`) puts the two together.

What the port provides, and why the handoff needs it:

- **who we are**: ``cluster_id`` and ``incarnation`` go into tickets, and tell a ticket of ours
  from one of a peer (or of our previous life);
- **where peers reach us**: ``listen_address`` is a ticket's endpoint;
- **is the engine running**: ``require_running`` refuses an operation as the engine's own
  operations do;
- **our caches**: ``local_cache`` finds the registration behind a ``Cache`` (with the engine's
  error when there is none): offered, fetched into or pushed from blocks are the engine's;
- **links**: ``live_link`` (no setup), ``link_endpoint`` (link to a ticket's endpoint as
  ``link_clusters`` would), ``watch_closed`` (a peer lost ends its fetches, claims and offers);
- **messages**: ``on`` routes a control-message kind of the handoff's protocol to its handler;
  requests and acks go over the link's own channel (``link.channel``);
- **background tasks**: ``spawn`` runs a task the engine waits for when it closes (lease
  expiry);
- **moving bytes**: ``transfer`` plans and moves one request over a link through the engine's
  mover (worker threads, in-use holds on the link and both caches, stats, a transport failure
  turned into a status, a dead peer's link closed);
- **the writer fence**: ``fence_writes`` waits out a tcp write into our memory that the data
  server already runs, after the writer's link (and so its data key) was cut;
- **settings**: ``options``, the engine's option table.

The records the handoff holds on to are the engine's own, re-exported here: a :class:`Link`
(its ``peer``, ``channel``, ``registry`` of advertised caches, ``closed``/``close``), our
registration :class:`LocalCache` and a peer's :class:`RemoteCache` (their layouts), and
:class:`OpStats` (latency counters, so the handoff's read like the links'). They go back into
``transfer`` unchanged, which is why they are not narrowed to Protocols. :class:`Blocks`, the
value that says which blocks a transfer moves (planned where the copy runs), is the engine's too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..config import EngineOptions
from ..engine.link import Link
from ..engine.links import MessageHandler
from ..engine.registry import LocalCache, RemoteCache
from ..engine.stats import OpStats
from ..engine.transfer import Blocks
from ..types import Cache

__all__ = [
    "Blocks",
    "EnginePort",
    "Link",
    "LinkWatcher",
    "LocalCache",
    "MessageHandler",
    "OpStats",
    "RemoteCache",
]

LinkWatcher = Callable[[Link], None]


class EnginePort(Protocol):
    """The engine as the handoff sees it (see the module docstring)."""

    @property
    def cluster_id(self) -> int:
        """This engine's cluster id."""
        ...

    @property
    def incarnation(self) -> str:
        """This engine's incarnation id (fresh per engine)."""
        ...

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """The (ip, port) peers link to, None when the engine does not listen."""
        ...

    @property
    def options(self) -> EngineOptions:
        """The engine's options."""
        ...

    def require_running(self, op: str) -> None:
        """Raise RuntimeError (naming ``op``) unless the engine is running."""
        ...

    def local_cache(self, op: str, cache: Cache) -> LocalCache:
        """The registration behind ``cache``; LLM_KV_CACHE_NOT_EXIST when it has none."""
        ...

    def live_link(self, cluster_id: int) -> Link | None:
        """The live link to ``cluster_id`` (ours, else the one it set up), None without."""
        ...

    async def link_endpoint(
        self, cluster_id: int, endpoint: tuple[str, int], timeout_ms: int
    ) -> Link | None:
        """Link to engine ``cluster_id`` listening at ``endpoint`` (as ``link_clusters``);
        the live link afterwards, None when linking failed."""
        ...

    def on(self, kind: str, handler: MessageHandler) -> None:
        """Route control messages of ``kind`` to ``handler`` (a task per message)."""
        ...

    def watch_closed(self, watcher: LinkWatcher) -> None:
        """Call ``watcher(link)`` when a link closes, whatever closed it."""
        ...

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` in a background task of the engine (waited for when it closes)."""
        ...

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
        """Move ``pieces`` (blocks of each selected tensor pair) between ``local`` and the
        peer's ``remote`` over ``link`` (``write``: towards the peer), holding all three in use
        until the native call returned; a failure raises ``LLMException`` naming ``op``."""
        ...

    async def fence_writes(self) -> None:
        """Wait until no tcp write into our memory that the data server runs is left."""
        ...
