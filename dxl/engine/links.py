"""The link table: an engine's live links, the messages that arrive on them, and their ends.

A link is added once its handshake succeeded (:mod:`dxl.engine.handshake`). Each side's
``link_clusters`` makes a link of its own, so two engines may hold two links to each other (one
each side set up, as LLM-DataDist's per-side links); transfers use the link this engine set up
and, where it has none, the one the peer set up. A link's control channel carries registry
changes (``reg_add``, ``reg_del``: the peer's caches as we see them), ``unlink``, and messages of
other components, which register a handler with :meth:`LinkTable.on` (e.g. ``consume`` for keyed
pulls). Each link also has its own data key: the data server admits a tcp connection only for a
live link, and when a link ends its key goes and its data connections are cut at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from typing import Any

from ..config import EngineOptions
from ..control import wire
from ..control.channel import Channel
from ..control.hello import PeerInfo
from ..control.messages import KINDS, DataInfo, Message, Probe, RegAdd, RegDel, Unlink
from ..errors import DxlError, LLMException, LLMStatusCode, fail, param_invalid
from ..guard import RateLimitedLog
from ..transport import Transport
from .link import Link
from .mover import Mover
from .registry import RemoteCache, RemoteRegistry
from .state import Identity

log = logging.getLogger("dxl")
limited = RateLimitedLog(log)

# a component's handler of one message kind: ``async def on_claim(link, msg: Claim)``
MessageHandler = Callable[[Link, Any], Awaitable[None]]
Revoke = Callable[[bytes], None]


class LinkTable:
    """Live links by peer cluster id (the one we set up, the one the peer set up), and setups
    in progress."""

    def __init__(self, identity: Identity, options: EngineOptions, mover: Mover) -> None:
        self._identity = identity
        self._opts = options
        self._mover = mover
        self._own: dict[int, Link] = {}  # links this engine set up (link_clusters)
        self._theirs: dict[int, Link] = {}  # links peers set up to this engine
        self.linking: set[int] = set()  # our setups in progress, by peer cluster id
        self.accepting: set[int] = set()  # peers' setups in progress
        self._keys: dict[bytes, bytes] = {}  # data key id -> key, of links set up or live
        self.revoke: Revoke | None = None  # cuts a key's data connections (the data server)
        self._handlers: dict[str, MessageHandler] = {}
        self._closed_watchers: list[Callable[[Link], None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._closing: set[asyncio.Task[None]] = set()

    def on(self, kind: str, handler: MessageHandler) -> None:
        """Route messages of ``kind`` (a kind of :data:`dxl.control.messages.KINDS`) to
        ``handler``, which takes that kind's message class; it runs in a task of its own, so it
        may wait on the peer."""
        if kind not in KINDS:
            raise ValueError(f"no message kind {kind!r}")
        self._handlers[kind] = handler

    def watch_closed(self, watcher: Callable[[Link], None]) -> None:
        """Call ``watcher(link)`` (on the loop) whenever a link ends."""
        self._closed_watchers.append(watcher)

    # ------------------------------------------------------------------ lookups
    def get(self, cluster_id: int) -> Link | None:
        """The live link transfers to ``cluster_id`` use: ours, else the peer's."""
        for table in (self._own, self._theirs):
            link = table.get(cluster_id)
            if link is not None and not link.closed:
                return link
        return None

    def own(self, cluster_id: int) -> Link | None:
        return self._own.get(cluster_id)

    def theirs(self, cluster_id: int) -> Link | None:
        return self._theirs.get(cluster_id)

    def __iter__(self) -> Iterator[Link]:
        return iter([*self._own.values(), *self._theirs.values()])

    def __len__(self) -> int:
        return len(self._own) + len(self._theirs)

    @property
    def busy(self) -> bool:
        """Links exist or are being set up."""
        return bool(self._own or self._theirs or self.linking or self.accepting)

    def route(self, op: str, cluster_id: int) -> Link:
        """The live link an operation on ``cluster_id`` uses."""
        if cluster_id == self._identity.cluster_id:
            raise param_invalid(op, f"the cache key names this engine's own cluster {cluster_id}")
        link = self.get(cluster_id)
        if link is None:
            raise fail(op, LLMStatusCode.LLM_NOT_YET_LINK, f"cluster {cluster_id} is not linked")
        return link

    # ------------------------------------------------------------------ data keys
    def add_key(self, key_id: bytes, key: bytes) -> None:
        """A link being set up may open data connections with this key from now on."""
        self._keys[key_id] = key

    def drop_key(self, key_id: bytes) -> None:
        """No data connection with this key any more: refused from now on, and the open ones
        cut."""
        if self._keys.pop(key_id, None) is not None and self.revoke is not None:
            self.revoke(key_id)

    def key_for(self, key_id: bytes) -> bytes | None:
        """The data server's lookup: the key of a live (or setting-up) link, else None."""
        return self._keys.get(key_id)

    # ------------------------------------------------------------------ links coming and going
    def add(
        self,
        peer: PeerInfo,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        transport: Transport,
        caches: list[dict[str, Any]],
        initiator: bool,
        key_id: bytes,
    ) -> Link:
        """Start a link whose handshake succeeded (its control connection and transport)."""
        channel = Channel(
            reader,
            writer,
            name=f"{self._identity.cluster_id}->{peer.cluster_id}",
            heartbeat_s=self._opts.heartbeat_interval_ms / 1000,
            peer_heartbeat_s=peer.heartbeat_ms / 1000,
        )
        link = Link(peer, channel, transport, RemoteRegistry(caches), initiator, key_id)
        (self._own if initiator else self._theirs)[peer.cluster_id] = link
        if peer.pool is not None:  # caches the peer allocated live in its memfd pool
            fd, base, size = peer.pool
            self._share(link, "pool", [[fd, 0, base, size, None]])
        for cache in link.registry.caches.values():
            self._share(link, cache.cache_id, cache.shm)

        async def handle(_: Channel, msg: Message) -> None:
            await self._on_message(link, msg)

        def on_close(_: Channel) -> None:
            self._on_closed(link)

        channel.start(handle, on_close)
        log.info(
            "dxl: cluster %d linked with cluster %d (pid %d) over %s (set up by %s)",
            self._identity.cluster_id,
            peer.cluster_id,
            peer.pid,
            transport.name,
            "us" if initiator else "the peer",
        )
        return link

    def _share(self, link: Link, key: Hashable, windows: Sequence[Sequence[int | None]]) -> None:
        """Let the link's transport use memory the peer shares (if it can); still correct
        without it, only slower."""
        if not windows:
            return
        try:
            jobs = link.transport.share_windows(key, windows)
        except OSError as exc:  # WindowRefused: the link goes on, those pieces take syscalls
            what = f"cache {key}" if key != "pool" else "the pool"
            link.window_refusal = f"{what}: {exc}"
            link.windows_refused += 1
            limited.warning(  # a peer that advertises many windows must not flood the log
                "window-refused",
                "dxl: not mapping %s of cluster %d (its pieces take the syscalls): %s",
                what,
                link.peer.cluster_id,
                exc,
            )
            return
        if jobs:
            self.spawn(self._mover.run_jobs(jobs))

    def _on_closed(self, link: Link) -> None:
        table = self._own if link.initiator else self._theirs
        if table.get(link.peer.cluster_id) is link:
            del table[link.peer.cluster_id]
        self.drop_key(link.key_id)  # its data connections end now, not when idle
        for watcher in self._closed_watchers:
            watcher(link)
        log.info(
            "dxl: link %d<->%d (set up by %s) closed: %s",
            self._identity.cluster_id,
            link.peer.cluster_id,
            "us" if link.initiator else "the peer",
            link.channel.close_reason,
        )

        async def finish() -> None:
            await link.usage.wait_idle(float("inf"))  # in-flight copies still use the transport
            link.transport.close()
            await link.channel.wait_closed()

        task = asyncio.create_task(finish())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def close_all(self, reason: str) -> None:
        for link in list(self):
            link.close(reason)

    async def wait_closed(self) -> None:
        """Wait for closed links to finish, and for background work."""
        await asyncio.gather(*self._closing, *self._background, return_exceptions=True)

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` in the background; the engine waits for it when it closes."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def alive(self, link: Link, timeout_s: float) -> bool:
        """Whether the peer still answers on ``link`` (a probe and its ack)."""
        if link.closed:
            return False
        try:
            await link.channel.request(Probe(), timeout_s)
        except LLMException:
            return False
        return not link.closed

    # ------------------------------------------------------------------ messages
    async def _on_message(self, link: Link, msg: Message) -> None:
        kind = msg.KIND
        if isinstance(msg, RegAdd):
            try:
                link.registry.add(msg.cache)
            except LLMException as exc:  # over the per-link bounds: refused, nothing stored
                limited.warning("reg-refused", "dxl: cluster %d: %s", link.peer.cluster_id, exc)
                link.channel.ack(msg.rid, int(exc.status_code), str(exc))
                return
            cache = link.registry.caches[msg.cache["id"]]
            self._share(link, cache.cache_id, cache.shm)
            link.channel.ack(msg.rid)
        elif isinstance(msg, DataInfo):  # before the reg_add it is about: same order here
            try:
                link.transport.peer_info(msg.info)
            except DxlError as exc:  # that cache stays out of reach; the link goes on
                limited.warning("data-info", "dxl: cluster %d: %s", link.peer.cluster_id, exc)
                link.channel.ack(msg.rid, int(LLMStatusCode.LLM_FAILED), str(exc))
                return
            link.channel.ack(msg.rid)
        elif isinstance(msg, RegDel):
            self.spawn(self._ack_when_idle(link, link.registry.remove(msg.id), msg.rid))
        elif isinstance(msg, Unlink):
            link.channel.ack(msg.rid)
            await link.channel.drain()
            link.close("peer unlinked")
        elif kind in self._handlers:  # may wait on the peer: not on the read loop
            self.spawn(self._handle(self._handlers[kind], link, msg))
        else:
            raise wire.FrameError(f"unexpected {kind} message on a live link")

    async def _handle(self, handler: MessageHandler, link: Link, msg: Message) -> None:
        """Run a component's handler; its failure fails that request only (an error ack if the
        message was one), never the link or the engine."""
        try:
            await handler(link, msg)
        except Exception as exc:  # a handler bug, or a peer's input it did not foresee
            limited.warning(
                "handler-error",
                "dxl: %s from cluster %d failed: %r",
                msg.KIND,
                link.peer.cluster_id,
                exc,
            )
            rid = getattr(msg, "rid", None)  # a request: its requester must not wait in vain
            if isinstance(rid, int):
                link.channel.ack(rid, int(LLMStatusCode.LLM_FAILED), f"{msg.KIND}: {exc!r}")

    async def _ack_when_idle(self, link: Link, cache: RemoteCache | None, rid: int) -> None:
        """Confirm an unregistration once no transfer of ours touches that cache any more."""
        if cache is not None:
            await cache.usage.wait_idle(float("inf"))  # native copies always finish
            link.transport.drop_windows(cache.cache_id)
        link.channel.ack(rid)

    async def broadcast(self, msg: RegAdd | RegDel | DataInfo) -> None:
        """Send a registry change to every live link and wait for each ack; a peer that does
        not answer in time is unlinked, since it can no longer be trusted to see the change."""
        timeout_s = self._opts.sync_kv_timeout_ms / 1000
        links = [link for link in self if not link.closed]

        async def one(link: Link) -> None:
            try:
                ack = await link.channel.request(msg, timeout_s)
                if ack.code:  # it answered, so it stays linked; it cannot use this cache
                    limited.warning(
                        "reg-refused-by-peer",
                        "dxl: cluster %d refused a registry change: %s",
                        link.peer.cluster_id,
                        ack.message,
                    )
            except LLMException as exc:
                if link.closed:  # the link went away meanwhile: nobody left to tell
                    return
                log.warning("dxl: unlinking cluster %d: %s", link.peer.cluster_id, exc)
                link.close(f"no answer to {msg.KIND}: {exc}")

        await asyncio.gather(*(one(link) for link in links))

    async def unlink(self, cluster_id: int, timeout_s: float, force: bool) -> LLMStatusCode:
        """End our link to ``cluster_id`` (or, if we set none up, the peer's): tell the peer
        and wait for its answer, or with ``force`` only drop the local end (the peer notices
        the closed connection)."""
        link = self._own.get(cluster_id) or self._theirs.get(cluster_id)
        if link is None:
            return LLMStatusCode.LLM_SUCCESS if force else LLMStatusCode.LLM_NOT_YET_LINK
        if force:
            link.close("unlinked locally (force)")
            return LLMStatusCode.LLM_SUCCESS
        try:
            await link.channel.request(Unlink(), timeout_s)
        except LLMException as exc:
            log.error("dxl: unlink of cluster %d: %s", cluster_id, exc)
            link.close("unlink got no answer")
            return LLMStatusCode.LLM_UNLINK_FAILED
        link.close("unlinked")
        return LLMStatusCode.LLM_SUCCESS

    def snapshot(self) -> dict[int, dict[str, Any]]:
        """Per peer: the link transfers use, how many links we hold to it, and how many of its
        memory windows those links map here."""
        shown: dict[int, dict[str, Any]] = {}
        for cid in {*self._own, *self._theirs}:
            link = self.get(cid) or self._own.get(cid) or self._theirs[cid]
            both = [x for x in (self._own.get(cid), self._theirs.get(cid)) if x is not None]
            shown[cid] = {
                **link.snapshot(),
                "links": len(both),
                "shared_windows": sum(x.transport.shared_windows for x in both),
            }
        return shown

    def transports(self) -> dict[str, int]:
        """How many links use each transport."""
        counts: dict[str, int] = {}
        for link in self:
            counts[link.transport.name] = counts.get(link.transport.name, 0) + 1
        return counts
