"""The async Engine: a small facade over components with one job each.

=====================  =========================================================================
component              job
=====================  =========================================================================
``Mover``              worker threads, inline policy, in-use holds, stats, transport failures
``CacheBook``          registrations, their keys and generations, native regions (in the
                       engine's own ``RegionRegistry``)
``LinkTable``          live links and the messages on them
``Listener``           the control listener and the tcp data server
``Handshake``          setting links up (identity, transport choice and proof)
``Resolver``           the resolve step of every transfer (link, caches, layer selection)
``LayerPort``          what layers above the engine (the request handoff) may use of it
operations             ``Registrations``, ``LinkOps``, ``BlockOps``, ``ContiguousOps``,
                       ``LayerwiseOps``, ``LocalCopies``: resolve -> plan -> move
=====================  =========================================================================

Every blocking native call runs on the mover's threads; the event loop only validates arguments
and keeps the books, so thousands of transfers can be awaited at once. One native call moves a
whole request. ``docs/architecture.md`` draws the components and the path of one pull.

Layers above the engine (the request handoff) are built on its :class:`LayerPort` with
:meth:`Engine.add_layer`; the engine imports none of them. ``dxl.Engine`` (:mod:`dxl.layers`)
is this engine with the handoff added.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self, TypeVar

from .. import _ffi
from .._forward import forward
from .._validate import check_isinstance, check_uint64
from ..config import EngineOptions, LLMConfig
from ..memory.regions import RegionRegistry
from ..transport.names import NIXL
from ..transport.nixl import NixlHost, agent_name
from ..transport.select import TransportBackend
from ..types import LLMRole
from .blocks import BlockOps
from .book import CacheBook
from .contiguous import ContiguousOps
from .handshake import Handshake
from .layerwise import LayerwiseOps
from .linking import LinkOps
from .links import LinkTable
from .listener import Listener
from .local import LocalCopies
from .mover import Mover
from .nixl_watch import NotifWatch
from .port import Layer, LayerPort
from .ranktable import RankTableLinks
from .registrations import Registrations
from .resolve import Resolver
from .state import Identity, RunState

L = TypeVar("L", bound=Layer)

# Engine.stats() keys of the engine itself; a layer's counters appear under its own name.
_STATS_KEYS = frozenset(
    {"cluster_id", "role", "state", "incarnation", "listen", "caches", "registered_addrs"}
    | {"links", "transports", "pull", "push", "data_server", "native"}
)


class Engine:
    """An async KV-cache transfer engine; one per prefill or decode instance.

    Use as ``async with Engine(cluster_id, role, config) as eng: ...``. Coroutines carry the
    operations of LLM-DataDist's ``LLMDataDist`` and ``CacheManager`` with the same names,
    arguments and errors.

    Args:
        cluster_id: uint64 id of this instance, unique among linked instances.
        role: an ``LLMRole`` label (roles do not restrict transfers in v2).
        config: an ``LLMConfig``, an option dict as produced by ``LLMConfig.generate_options()``,
            or None for defaults. ``listen_ip_info`` makes the engine accept links.
        transport_backend: opens the data path of every link instead of ``dxl.Transport``
            (e.g. ``dxl.transport.inprocess``: engines of one process, by memcpy, with faults
            injected, for tests); one per engine. None (the default): cma or tcp.
    """

    def __init__(
        self,
        cluster_id: int,
        role: LLMRole,
        config: LLMConfig | dict[str, str] | None = None,
        *,
        transport_backend: TransportBackend | None = None,
    ) -> None:
        check_uint64("cluster_id", cluster_id)
        check_isinstance("role", role, LLMRole, allow_none=False)
        if isinstance(config, LLMConfig):
            options = dict(config.generate_options())
        elif config is None:
            options = {}
        else:
            check_isinstance("config", config, dict)
            options = dict(config)
        opts = self._opts = EngineOptions.from_options(options)
        identity = self._identity = Identity(cluster_id, role)
        state = self._state = RunState(cluster_id)
        mover = self._mover = Mover(
            f"dxl-{cluster_id}", opts.transfer_threads, opts.inline_bytes, opts.sync_kv_timeout_ms
        )
        # what this engine's data server may serve: its own regions, never another engine's
        regions = self._regions = RegionRegistry()
        self._backend = transport_backend
        if transport_backend is not None:
            transport_backend.attach(cluster_id, identity.incarnation, regions)
        # the NIXL agent (made on the first nixl link) registers every cache's memory too
        self._nixl = (
            NixlHost(
                agent_name(cluster_id, identity.incarnation),
                identity.probe_wire,
                allow_emulated=opts.nixl_allow_emulated,
                device_id=opts.device_id or 0,
            )
            if opts.transport == NIXL
            else None
        )
        book = self._book = CacheBook(
            opts.max_registered_addrs, regions, self._nixl, device_id=opts.device_id or 0
        )
        links = self._links = LinkTable(identity, opts, mover)
        # drains the agent's notifications, which peers could otherwise pile up in our memory
        self._nixl_watch = NotifWatch(self._nixl, links) if self._nixl is not None else None
        listener = self._listener = Listener(identity, opts, mover, regions)
        links.revoke = listener.revoke  # a link's key goes: its data connections to us end
        self._registrations = Registrations(opts, state, book, links, listener, mover, self)
        handshake = self._handshake = Handshake(
            identity,
            opts,
            state,
            book,
            links,
            mover,
            data_port=lambda: listener.data_port,
            data_ip=lambda: listener.data_ip,
            pool=self._registrations.pool_wire,
            backend=transport_backend,
            nixl=self._nixl,
        )
        self._linking = LinkOps(identity, opts, state, links, listener, handshake)
        self._ranktable = RankTableLinks(
            identity, opts, state, links, listener, self._linking, handshake
        )
        resolver = Resolver(state, book, links)
        self._contiguous = ContiguousOps(
            opts, resolver, mover, book, links, self._registrations, state
        )
        self._blocks = BlockOps(resolver, mover, self._contiguous)
        self._layerwise = LayerwiseOps(state, resolver, links, mover)
        self._local = LocalCopies(state, resolver, mover)
        self._port = LayerPort(
            identity, opts, state, links, self._linking, listener, mover, resolver
        )
        self._layers: dict[str, Layer] = {}

    # ------------------------------------------------------------------ identity
    @property
    def cluster_id(self) -> int:
        return self._identity.cluster_id

    @property
    def role(self) -> LLMRole:
        return self._identity.role

    @property
    def incarnation(self) -> str:
        """A fresh id per engine: peers tell a restarted engine from the one they linked."""
        return self._identity.incarnation

    @property
    def options(self) -> EngineOptions:
        return self._opts

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """The (ip, port) this engine accepts links on, with the real port when 0 was asked."""
        return self._listener.address

    # ------------------------------------------------------------------ lifecycle
    def add_layer(self, name: str, factory: Callable[[LayerPort], L]) -> L:
        """Build a layer above this engine (``factory(port)``, e.g. the request handoff) and
        carry it: it closes with the engine, before the links go, and its ``stats()`` appear in
        :meth:`stats` under ``name``. Only before :meth:`start` (a layer routes its messages
        before the first link arrives); ``name`` is unique."""
        check_isinstance("name", name, str, allow_none=False)
        if not name.isidentifier() or name in self._layers or name in _STATS_KEYS:
            raise ValueError(f"layer name {name!r} must be an identifier not used yet")
        if self._state.value != "new":
            raise RuntimeError(f"engine {self.cluster_id}: add layers before start()")
        layer = factory(self._port)
        self._layers[name] = layer
        return layer

    async def __aenter__(self) -> Self:
        if self._state.value == "new":  # an engine already started may still be a context
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the workers and, with ``listen_ip_info``, accept links."""
        if self._state.value != "new":
            raise RuntimeError(f"engine {self.cluster_id} was already started")
        self._mover.start()
        self._state.value = "running"
        if self._nixl_watch is not None:
            self._nixl_watch.start()
        try:
            self._registrations.open_pool(f"dxl-host-pool-{self.cluster_id}")
            if self._opts.listen is not None:
                await self._linking.listen("init", self._opts.listen)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Unlink everything (locally), stop listening, and release all native resources."""
        if self._state.value in ("closing", "closed"):
            return
        self._state.value = "closing"
        self._listener.stop_accepting()  # no new links while the old ones go
        await self._handshake.close()
        await self._ranktable.close()
        for layer in reversed(self._layers.values()):  # a layer may use the ones below it
            await layer.close()
        self._links.close_all("engine closed")
        await self._links.wait_closed()
        await self._registrations.close()
        await self._listener.stop()  # stops the data server too, after its regions went
        if self._backend is not None:  # no in-process peer reads it any more either
            self._backend.detach()
        self._regions.close()  # no server reads it any more
        if self._nixl_watch is not None:  # no link is left to cut
            await self._nixl_watch.close()
        if self._nixl is not None:  # every link and registration is gone
            self._nixl.close()
        self._registrations.close_pool()
        self._mover.shutdown()
        self._state.value = "closed"

    # ------------------------------------------------------------------ operations
    register_blocks_cache = forward("_registrations", Registrations.register_blocks_cache)
    register_cache = forward("_registrations", Registrations.register_cache)
    unregister_cache = forward("_registrations", Registrations.unregister_cache)
    allocate_cache = forward("_registrations", Registrations.allocate_cache)
    allocate_blocks_cache = forward("_registrations", Registrations.allocate_blocks_cache)
    deallocate_cache = forward("_registrations", Registrations.deallocate_cache)
    deallocate_blocks_cache = forward("_registrations", Registrations.deallocate_blocks_cache)

    link_clusters = forward("_linking", LinkOps.link_clusters)
    unlink_clusters = forward("_linking", LinkOps.unlink_clusters)
    switch_role = forward("_linking", LinkOps.switch_role)
    link = forward("_ranktable", RankTableLinks.link)
    unlink = forward("_ranktable", RankTableLinks.unlink)
    query_register_mem_status = forward("_ranktable", RankTableLinks.query_register_mem_status)

    pull_blocks = forward("_blocks", BlockOps.pull_blocks)
    push_blocks = forward("_blocks", BlockOps.push_blocks)
    pull_cache = forward("_contiguous", ContiguousOps.pull_cache)
    push_cache = forward("_contiguous", ContiguousOps.push_cache)
    remove_cache_key = forward("_contiguous", ContiguousOps.remove_cache_key)
    check_cache_key = staticmethod(ContiguousOps.check_cache_key)
    transfer_cache_async = forward("_layerwise", LayerwiseOps.transfer_cache_async)

    copy_cache = forward("_local", LocalCopies.copy_cache)
    copy_blocks = forward("_local", LocalCopies.copy_blocks)
    swap_blocks = forward("_local", LocalCopies.swap_blocks)

    # ------------------------------------------------------------------ observability
    def stats(self) -> dict[str, Any]:
        """Counters of this engine: registrations, links and per-transport traffic."""
        native = _ffi.counters()
        listen = self.listen_address
        return {
            "cluster_id": self.cluster_id,
            "role": self.role.name,
            "state": self._state.value,
            "incarnation": self.incarnation,
            "listen": "{}:{}".format(*listen) if listen else None,
            "caches": len(self._book),
            "registered_addrs": self._book.registered_addrs,
            "links": self._links.snapshot(),
            "transports": self._links.transports(),
            **self._mover.snapshot(),
            "data_server": self._listener.stats(),
            **{name: layer.stats() for name, layer in self._layers.items()},
            "native": {
                k: native[k]
                for k in ("regions_live", "peers_open", "ops_inflight", "bytes_registered")
            },
        }


__all__ = ["Engine"]
