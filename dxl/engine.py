"""The async core: one Engine owns the registry, the links, the transports and an executor.

Every blocking native call runs on the engine's own worker threads through ``_run_native``;
the event loop only validates arguments and keeps the books, so thousands of transfers can be
awaited at once without stalling it. One native call moves a whole request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from . import _ffi, args, wire
from ._validate import check_int32, check_int64, check_isinstance, check_uint64
from .config import EngineOptions, LLMConfig, listen_from_options
from .control import Channel
from .errors import LLMException, LLMStatusCode
from .executor import NativeExecutor
from .keys import Binding, KeyTable
from .link import Link, PeerInfo
from .linking import LinkSetup
from .ops_contiguous import ContiguousOps
from .ops_layerwise import LayerwiseOps
from .ops_local import LocalOps
from .plan import Pieces, Scratch, block_pieces
from .registry import Layout, LocalCache, RemoteCache, RemoteRegistry
from .share import SHARED, Window
from .stats import OpStats
from .transport import CmaTransport, Transport, TransportClosed, Unreachable
from .types import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    LLMClusterInfo,
    LLMRole,
    Placement,
)
from .usage import hold

log = logging.getLogger("dxl")

T = TypeVar("T")
Status = LLMStatusCode

MAX_PARALLEL_LINKS = 16  # clusters linked concurrently per call, as the reference
INLINE_PER_TURN = 8  # inline copies per loop iteration: bounds the loop's stall to ~0.5 ms


class Engine(LinkSetup, ContiguousOps, LayerwiseOps, LocalOps):
    """An async KV-cache transfer engine; one per prefill or decode instance.

    Use as ``async with Engine(cluster_id, role, config) as eng: ...``. Coroutines carry the
    operations of LLM-DataDist's ``LLMDataDist`` and ``CacheManager`` with the same names,
    arguments and errors.

    Args:
        cluster_id: uint64 id of this instance, unique among linked instances.
        role: an ``LLMRole`` label (roles do not restrict transfers in v2).
        config: an ``LLMConfig``, an option dict as produced by ``LLMConfig.generate_options()``,
            or None for defaults. ``listen_ip_info`` makes the engine accept links.
    """

    def __init__(
        self, cluster_id: int, role: LLMRole, config: LLMConfig | dict[str, str] | None = None
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
        self._opts = EngineOptions.from_options(options)
        self._cluster_id = cluster_id
        self._role = role
        self.incarnation = uuid.uuid4().hex
        self._state = "new"
        self._caches: dict[int, LocalCache] = {}
        self._blocks_by_model: dict[int, LocalCache] = {}
        self._keys = KeyTable()
        self._scratch = Scratch()  # reused arrays for very large plans
        self._inline_turns = 0  # inline copies in the current loop iteration
        self._next_cache_id = 1
        self._gen = 0
        self._links: dict[int, Link] = {}
        self._linking: set[int] = set()
        self._server: asyncio.Server | None = None
        self._data = None  # the native tcp data server, while listening
        self._probe_region = 0
        self._executor: NativeExecutor | None = None
        self._host_pool = None
        self._registry_lock = asyncio.Lock()
        self._closing_links: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        # 8 bytes a peer reads through CMA at link time to prove the transport works both ways
        self._probe = np.array([secrets.randbits(63) + 1], dtype=np.uint64)
        self._pull_stats = OpStats()
        self._push_stats = OpStats()

    # ------------------------------------------------------------------ lifecycle
    @property
    def cluster_id(self) -> int:
        return self._cluster_id

    @property
    def role(self) -> LLMRole:
        return self._role

    @property
    def options(self) -> EngineOptions:
        return self._opts

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """The (ip, port) this engine accepts links on, with the real port when 0 was asked."""
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def __aenter__(self) -> Engine:
        if self._state == "new":  # an engine already started may still be used as a context
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Create the executor and, with ``listen_ip_info``, start accepting links."""
        if self._state != "new":
            raise RuntimeError(f"engine {self._cluster_id} was already started")
        threads = max(4, 2 * self._opts.transfer_threads)
        self._executor = NativeExecutor(threads, f"dxl-{self._cluster_id}")
        self._state = "running"
        try:
            self._open_pools()
            if self._opts.listen is not None:
                await self._listen(self._opts.listen)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Unlink everything (locally), stop listening, and release all native resources."""
        if self._state in ("closing", "closed"):
            return
        self._state = "closing"
        if self._server is not None:
            self._server.close()  # no new links while the old ones go
        for link in list(self._links.values()):
            link.channel.close("engine closed")
        await asyncio.gather(*self._closing_links, *self._background, return_exceptions=True)
        for entry in self._caches.values():
            await entry.usage.wait_idle(float("inf"))
            self._release_regions(entry)
            self._release_shared(entry)  # links are gone: no peer maps it any more
        self._caches.clear()
        self._blocks_by_model.clear()
        await self._stop_listening()  # stops the data server too, after its regions went
        self._close_pools()
        if self._executor is not None:
            self._executor.shutdown()
        self._state = "closed"

    def _require_running(self, op: str) -> None:
        if self._state != "running":
            raise RuntimeError(f"{op}: engine {self._cluster_id} is not running ({self._state})")

    def _take_inline_turn(self) -> bool:
        """At most INLINE_PER_TURN inline copies per loop iteration, so a burst of small
        requests started together cannot hold the loop (the rest use the workers)."""
        if self._inline_turns == 0:
            asyncio.get_running_loop().call_soon(self._reset_inline_turns)
        if self._inline_turns >= INLINE_PER_TURN:
            return False
        self._inline_turns += 1
        return True

    def _reset_inline_turns(self) -> None:
        self._inline_turns = 0

    async def _run_native(
        self, fn: Callable[..., T], *fn_args: Any, on_done: Callable[[], None] | None = None
    ) -> T:
        """Run a blocking native call on the executor. Cancellation waits for the native side
        to stop touching the buffers before it propagates; ``on_done`` runs (on the loop) when
        the call has returned, whatever happens to the awaiting coroutine."""
        assert self._executor is not None
        fut = self._executor.submit(fn, *fn_args)
        if on_done is not None:
            fut.add_done_callback(lambda _: on_done())
        cancelled = False
        while True:
            try:
                result = await asyncio.shield(fut)
                break
            except asyncio.CancelledError:
                if fut.done():
                    raise
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        return result

    # ------------------------------------------------------------------ registration
    async def register_blocks_cache(
        self,
        cache_desc: CacheDesc,
        addrs: list[int],
        blocks_cache_key: BlocksCacheKey | None = None,
        remote_accessible: bool | None = None,
        *,
        share: bool | None = None,
    ) -> Cache:
        """Register framework-allocated paged KV memory: ``addrs[i]`` is tensor i.

        Block k of tensor i is ``[k * block_bytes, (k + 1) * block_bytes)`` from ``addrs[i]``,
        with ``num_blocks = cache_desc.shape[0]``. ``remote_accessible`` defaults to True for
        DEVICE and False for HOST; only remotely accessible caches are visible to peers.
        ``share`` (dxl extension; None: the engine's ``dxl.ShareRegistered``) moves the
        tensors' whole pages onto memfds in place so same-host peers copy them with memcpy;
        it needs a remotely accessible HOST cache (docs/api.md says when it is safe).
        """
        op = "register_blocks_cache"
        self._check_register_args(op, cache_desc, addrs, remote_accessible, share)
        check_isinstance("blocks_cache_key", blocks_cache_key, BlocksCacheKey)
        model_id = blocks_cache_key.model_id if blocks_cache_key is not None else None
        return await self._register(
            op, cache_desc, addrs, True, model_id, remote_accessible, share=share
        )

    async def register_cache(
        self,
        cache_desc: CacheDesc,
        addrs: list[int],
        cache_keys: tuple[CacheKey, ...] | list[CacheKey] = (),
        remote_accessible: bool | None = None,
        *,
        share: bool | None = None,
    ) -> Cache:
        """Register framework-allocated contiguous memory: ``addrs[i]`` is tensor i, batch b of
        a tensor is ``[b * stride, (b + 1) * stride)`` with ``stride = size / shape[0]``.
        ``share`` as for :meth:`register_blocks_cache`."""
        op = "register_cache"
        self._check_register_args(op, cache_desc, addrs, remote_accessible, share)
        check_isinstance("cache_keys", cache_keys, (list, tuple), allow_none=False, inner=CacheKey)
        return await self._register(
            op, cache_desc, addrs, False, None, remote_accessible, cache_keys, share=share
        )

    def _check_register_args(
        self, op: str, cache_desc: Any, addrs: Any, remote_accessible: Any, share: Any = None
    ) -> None:
        if cache_desc is None:
            raise AttributeError(f"{op}: cache_desc is None; pass a CacheDesc")
        check_isinstance("cache_desc", cache_desc, CacheDesc)
        check_isinstance("addrs", addrs, list, allow_none=False, inner=int)
        check_isinstance("remote_accessible", remote_accessible, bool)
        check_isinstance("share", share, bool)
        if not addrs:
            raise args.param_invalid(op, "addrs must not be empty")

    async def _register(
        self,
        op: str,
        desc: CacheDesc,
        addrs: list[int],
        blocks: bool,
        model_id: int | None,
        remote_accessible: bool | None,
        cache_keys: list[CacheKey] | tuple[CacheKey, ...] = (),
        pool_addrs: list[int] | None = None,
        share: bool | None = None,
    ) -> Cache:
        """Register a cache (user memory, or ``pool_addrs`` allocated by the engine): every
        check first, then the books, then peers are told before this returns."""
        self._require_running(op)
        layout = self._layout(op, desc, addrs, blocks)
        bindings = self._check_registrable(op, layout, model_id, cache_keys)
        if remote_accessible is None:
            remote_accessible = desc.placement == Placement.DEVICE
        self._check_mapped(op, layout)
        if share and not remote_accessible:
            raise args.param_invalid(
                op, "share=True needs remote_accessible=True: only memory peers read is shared"
            )
        if share is None:
            share = self._opts.share_registered
        shared: list[Window] = []
        if share and remote_accessible and pool_addrs is None:
            shared = await self._share(layout)
            try:  # other registrations may have landed while the pages moved
                bindings = self._check_registrable(op, layout, model_id, cache_keys)
            except BaseException:
                SHARED.release(shared)
                raise
        region_ids = self._add_regions(layout) if remote_accessible else []
        cache = Cache(
            self._next_cache_id,
            desc,
            list(addrs),
            self,
            is_registered=pool_addrs is None,
            is_blocks_cache=blocks,
            remote_accessible=remote_accessible,
        )
        self._next_cache_id += 1
        self._gen += 1
        entry = LocalCache(
            cache,
            layout,
            remote_accessible,
            model_id,
            self._gen,
            region_ids,
            bindings=bindings,
            pool_addrs=pool_addrs,
            shared=shared,
        )
        self._keys.bind(bindings, layout.num_tensors)
        async with self._registry_lock:
            self._caches[cache.cache_id] = entry
            if model_id is not None:
                self._blocks_by_model[model_id] = entry
            if remote_accessible:
                await self._broadcast("reg_add", cache=entry.wire_entry())
        return cache

    def _check_registrable(
        self,
        op: str,
        layout: Layout,
        model_id: int | None,
        cache_keys: list[CacheKey] | tuple[CacheKey, ...],
    ) -> list[Binding]:
        """The checks against the engine's books; returns the key bindings to make."""
        bindings = self._keys.plan_bindings(op, self._next_cache_id, cache_keys, layout.units)
        in_use = sum(e.layout.num_tensors for e in self._caches.values())
        limit = self._opts.max_registered_addrs
        if in_use + layout.num_tensors > limit:
            raise args.param_invalid(
                op,
                f"registering {layout.num_tensors} more addresses would make "
                f"{in_use + layout.num_tensors}, over the limit of {limit} registered addresses "
                "(LLMConfig.max_registered_addrs)",
            )
        if model_id is not None and model_id in self._blocks_by_model:
            other = self._blocks_by_model[model_id].cache.cache_id
            raise args.param_invalid(
                op, f"BlocksCacheKey model_id={model_id} is already bound to cache {other}"
            )
        return bindings

    async def _share(self, layout: Layout) -> list[Window]:
        """Move the tensors' whole pages onto memfds (``dxl.ShareRegistered``), on the
        executor: it copies the memory once."""
        ranges = [(a, a + layout.tensor_size) for a in layout.addrs.tolist()]
        got: list[list[Window]] = []
        try:
            await self._run_native(lambda: got.append(SHARED.share(ranges)))
        except asyncio.CancelledError:  # the call has finished: give its shares back
            for windows in got:
                SHARED.release(windows)
            raise
        return got[0]

    def _layout(self, op: str, desc: CacheDesc, addrs: list[int], blocks: bool) -> Layout:
        if desc.placement != Placement.HOST:
            raise args.fail(
                op,
                Status.LLM_FEATURE_NOT_ENABLED,
                "Placement.DEVICE needs the cuda transport, which this build does not have yet",
            )
        if desc.num_tensors == 0 or len(addrs) != desc.num_tensors:
            raise args.param_invalid(
                op,
                f"addrs must hold one address per tensor: cache_desc.num_tensors is "
                f"{desc.num_tensors}, len(addrs) is {len(addrs)}",
            )
        size = desc.size
        units = int(desc.shape[0])
        if size <= 0 or units <= 0 or size % units:
            raise args.param_invalid(
                op, f"cache_desc shape {list(desc.shape)} gives no whole blocks/batches on dim 0"
            )
        for i, addr in enumerate(addrs):
            if addr <= 0 or addr + size > (1 << 64) - 1:
                raise args.param_invalid(op, f"addrs[{i}]={addr} is not a valid address")
        return Layout(np.asarray(addrs, dtype=np.uint64), size, units, blocks)

    def _check_mapped(self, op: str, layout: Layout) -> None:
        """Refuse addresses this process cannot read: a peer must never be sent to them."""
        first = layout.addrs
        last = layout.addrs + np.uint64(layout.tensor_size - 1)
        rc = _ffi.lib.dxl_check_readable(
            _ffi.as_u64_ptr(np.concatenate([first, last])), 2 * layout.num_tensors
        )
        if rc < 0:
            raise args.param_invalid(
                op, "addrs must point to mapped memory of this process of cache_desc.size bytes"
            )

    def _add_regions(self, layout: Layout) -> list[int]:
        ids = []
        out = _ffi.ffi.new("uint64_t *")
        for addr in layout.addrs.tolist():
            _ffi.check(_ffi.lib.dxl_region_add(addr, layout.tensor_size, out), "register region")
            ids.append(int(out[0]))
        return ids

    @staticmethod
    def _release_regions(entry: LocalCache) -> None:
        for rid in entry.region_ids:
            _ffi.lib.dxl_region_remove(rid)
        entry.region_ids.clear()

    @staticmethod
    def _release_shared(entry: LocalCache) -> None:
        SHARED.release(entry.shared)
        entry.shared = []

    async def unregister_cache(self, cache_id: int) -> None:
        """Forget a registration. Linked peers are told first, and their transfers using it are
        waited for (bounded by sync_kv_timeout; a peer that does not confirm loses its link).
        An unknown id is a no-op."""
        check_int64("cache_id", cache_id)
        self._require_running("unregister_cache")
        entry = self._caches.get(cache_id)
        if entry is None or entry.pool_addrs is not None:  # allocated caches: deallocate_*
            return
        await self._retire(entry)

    async def _retire(self, entry: LocalCache) -> None:
        """Remove a cache from the books: peers first (they confirm they stopped using it),
        then local transfers, then the native regions and any pool memory."""
        cache_id = entry.cache.cache_id
        async with self._registry_lock:
            if self._caches.get(cache_id) is not entry:
                return
            del self._caches[cache_id]
            if entry.model_id is not None and self._blocks_by_model.get(entry.model_id) is entry:
                del self._blocks_by_model[entry.model_id]
            self._keys.drop_cache(cache_id)
            if entry.remote_accessible:
                await self._broadcast("reg_del", id=cache_id, gen=entry.gen)
        await entry.usage.wait_idle(float("inf"))  # local copies always finish: wait them out
        self._release_regions(entry)
        await self._fence_data_server()  # tcp requests that passed the check have finished
        self._release_shared(entry)  # peers confirmed: they unmapped it
        self._free_pool_memory(entry)

    async def _republish(self, entry: LocalCache) -> None:
        """Send peers the new version of an entry whose key bindings changed."""
        self._gen += 1
        entry.gen = self._gen
        if entry.remote_accessible:
            async with self._registry_lock:
                await self._broadcast("reg_add", cache=entry.wire_entry())

    def _advertised(self) -> list[dict[str, Any]]:
        return [e.wire_entry() for e in self._caches.values() if e.remote_accessible]

    async def _broadcast(self, kind: str, **fields: Any) -> None:
        """Send a registry change to every live link and wait for each ack; a peer that does not
        answer in time is unlinked, since it can no longer be trusted to see the change."""
        timeout_s = self._opts.sync_kv_timeout_ms / 1000
        links = [link for link in self._links.values() if not link.closed]

        async def one(link: Link) -> None:
            try:
                await link.channel.request(kind, timeout_s, **fields)
            except LLMException as exc:
                if link.closed:  # the link went away meanwhile: nobody left to tell
                    return
                log.warning("dxl: unlinking cluster %d: %s", link.peer.cluster_id, exc)
                link.channel.close(f"no answer to {kind}: {exc}")

        await asyncio.gather(*(one(link) for link in links))

    # ------------------------------------------------------------------ links
    async def link_clusters(
        self,
        clusters: list[LLMClusterInfo] | tuple[LLMClusterInfo, ...],
        timeout: int = 3000,
    ) -> tuple[LLMStatusCode, list[LLMStatusCode]]:
        """Link to listening peers. Failures are returned per cluster, not raised.

        Returns:
            ``(overall, per_cluster)``; ``overall`` is LLM_SUCCESS only if every cluster linked.
        """
        self._check_link_args("link_clusters", clusters, timeout, need_local_ip=True)
        self._require_running("link_clusters")
        sem = asyncio.Semaphore(MAX_PARALLEL_LINKS)

        async def one(info: LLMClusterInfo) -> LLMStatusCode:
            async with sem:
                return await self._link_one(info, timeout / 1000)

        results = list(await asyncio.gather(*(one(c) for c in clusters)))
        return _overall(results), results

    def _check_link_args(self, op: str, clusters: Any, timeout: Any, need_local_ip: bool) -> None:
        check_int32("timeout", timeout)
        if timeout <= 0:
            raise args.param_invalid(op, f"timeout must be > 0 ms, got {timeout}")
        check_isinstance(
            "clusters", clusters, (list, tuple), allow_none=False, inner=LLMClusterInfo
        )
        for i, info in enumerate(clusters):
            check_uint64(f"clusters[{i}].remote_cluster_id", info.remote_cluster_id)
            if need_local_ip and not info.local_ip_info_list and "llm.LocalCommRes" not in (
                self._opts.raw
            ):
                raise args.param_invalid(
                    op, f"clusters[{i}].local_ip_info_list is empty; call append_local_ip_info"
                )

    def _add_link(
        self,
        peer: PeerInfo,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        transport: Transport,
        caches: list[dict[str, Any]],
        initiator: bool,
    ) -> Link:
        channel = Channel(
            reader,
            writer,
            name=f"{self._cluster_id}->{peer.cluster_id}",
            heartbeat_s=self._opts.heartbeat_interval_ms / 1000,
        )
        link = Link(peer, channel, transport, RemoteRegistry(caches), initiator)
        self._links[peer.cluster_id] = link
        for cache in link.registry.caches.values():
            self._map_shared(link, cache)

        async def handle(_: Channel, msg: dict[str, Any]) -> None:
            await self._on_link_message(link, msg)

        def on_close(_: Channel) -> None:
            self._on_link_closed(link)

        channel.start(handle, on_close)
        log.info(
            "dxl: cluster %d linked with cluster %d (pid %d) over %s",
            self._cluster_id, peer.cluster_id, peer.pid, transport.name,
        )
        return link

    async def _on_link_message(self, link: Link, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == "reg_add":
            link.registry.add(msg["cache"])
            self._map_shared(link, link.registry.caches[msg["cache"]["id"]])
            link.channel.ack(msg["rid"])
        elif kind == "reg_del":
            cache = link.registry.remove(msg["id"])
            self._spawn(self._ack_when_idle(link, cache, msg["rid"]))
        elif kind == "consume":  # may broadcast and wait for acks: not on the read loop
            self._spawn(self._on_consume(link, msg))
        elif kind == "unlink":
            link.channel.ack(msg["rid"])
            await link.channel.drain()
            link.channel.close("peer unlinked")
        else:
            raise wire.FrameError(f"unexpected {kind} message on a live link")

    async def _ack_when_idle(self, link: Link, cache: RemoteCache | None, rid: int) -> None:
        """Confirm an unregistration once no transfer of ours touches that cache any more."""
        if cache is not None:
            await cache.usage.wait_idle(float("inf"))  # native copies always finish
            if isinstance(link.transport, CmaTransport):
                link.transport.unmap_shared(cache.cache_id)
        link.channel.ack(rid)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_link_closed(self, link: Link) -> None:
        if self._links.get(link.peer.cluster_id) is link:
            del self._links[link.peer.cluster_id]
        log.info(
            "dxl: link %d<->%d closed: %s",
            self._cluster_id, link.peer.cluster_id, link.channel.close_reason,
        )

        async def finish() -> None:
            await link.usage.wait_idle(float("inf"))  # in-flight copies still use the transport
            link.transport.close()
            await link.channel.wait_closed()

        task = asyncio.create_task(finish())
        self._closing_links.add(task)
        task.add_done_callback(self._closing_links.discard)

    async def unlink_clusters(
        self,
        clusters: list[LLMClusterInfo] | tuple[LLMClusterInfo, ...],
        timeout: int = 3000,
        force: bool = False,
    ) -> tuple[LLMStatusCode, list[LLMStatusCode]]:
        """Tear links down. ``force=False`` tells the peer and waits for its answer;
        ``force=True`` only drops the local end (the peer notices the closed connection)."""
        self._check_link_args("unlink_clusters", clusters, timeout, need_local_ip=False)
        check_isinstance("force", force, bool, allow_none=False)
        self._require_running("unlink_clusters")
        results = list(
            await asyncio.gather(*(self._unlink_one(c, timeout / 1000, force) for c in clusters))
        )
        return _overall(results), results

    async def _unlink_one(self, info: LLMClusterInfo, timeout_s: float, force: bool) -> Status:
        link = self._links.get(info.remote_cluster_id)
        if link is None:
            return Status.LLM_SUCCESS if force else Status.LLM_NOT_YET_LINK
        if force:
            link.channel.close("unlinked locally (force)")
            return Status.LLM_SUCCESS
        try:
            await link.channel.request("unlink", timeout_s)
        except LLMException as exc:
            log.error("dxl: unlink of cluster %d: %s", info.remote_cluster_id, exc)
            link.channel.close("unlink got no answer")
            return Status.LLM_UNLINK_FAILED
        link.channel.close("unlinked")
        return Status.LLM_SUCCESS

    async def switch_role(
        self, role: LLMRole, switch_options: dict[str, str] | None = None
    ) -> None:
        """Change the role label and the listener: ``llm.listenIpInfo`` in ``switch_options``
        (re)listens there (the same address keeps the listener); without it the engine stops
        listening. Refused with ``LLM_EXIST_LINK`` while any link exists."""
        op = "switch_role"
        check_isinstance("role", role, LLMRole, allow_none=False)
        check_isinstance("switch_options", switch_options, dict)
        self._require_running(op)
        listen = listen_from_options(switch_options or {})
        if self._links or self._linking:
            raise args.fail(
                op,
                Status.LLM_EXIST_LINK,
                f"{len(self._links)} link(s) exist; unlink every cluster before switching role",
            )
        current = self.listen_address
        same_port = listen is not None and current is not None and 0 != listen[1] == current[1]
        if not same_port:
            await self._stop_listening()
            if listen is not None:
                await self._listen(listen)
        self._role = role
        log.info("dxl: cluster %d switched to %s", self._cluster_id, role.name)

    # ------------------------------------------------------------------ transfers
    async def pull_blocks(
        self,
        src_cache_key: BlocksCacheKey,
        dst_cache: Cache,
        src_blocks: list[int] | tuple[int, ...] | None = (),
        dst_blocks: list[int] | tuple[int, ...] = (),
        **kwargs: Any,
    ) -> None:
        """Copy remote blocks ``src_blocks[i]`` of the peer's cache bound to ``src_cache_key``
        into local blocks ``dst_blocks[i]`` of ``dst_cache``, for every tensor (or the tensors
        of ``src_layer_range``/``dst_layer_range`` with ``tensor_num_per_layer`` per layer)."""
        op = "pull_blocks"
        check_isinstance(
            "src_cache_key",
            src_cache_key,
            (BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex),
            allow_none=False,
        )
        args.check_cache_arg(op, "dst_cache", dst_cache)
        src = args.block_list(op, "src_blocks", src_blocks)
        dst = args.block_list(op, "dst_blocks", dst_blocks)
        if not dst_cache.is_blocks_cache:
            raise args.param_invalid(op, "dst_cache must be a blocks cache")
        if dst.size == 0:
            raise args.param_invalid(op, "dst_blocks must not be empty")
        src_range, dst_range, tnpl = args.layer_kwargs(op, kwargs)
        args.check_tensor_num_per_layer(op, tnpl)
        args.check_ranges(op, src_range, dst_range)
        if not isinstance(src_cache_key, BlocksCacheKey):
            if src.size:
                raise args.param_invalid(
                    op, "src_blocks must be empty when pulling from a contiguous cache"
                )
            await self._pull_contiguous_to_blocks(
                op, src_cache_key, dst_cache, dst, src_range, dst_range, tnpl
            )
            return
        if src.size == 0:
            raise args.param_invalid(op, "src_blocks must not be empty for a BlocksCacheKey")
        self._require_running(op)
        link = self._link_for(op, src_cache_key.cluster_id)
        local = self._local_for(op, dst_cache)
        remote = self._remote_blocks(op, link, src_cache_key)
        dst_bases, src_bases = self._select(
            op, local.layout, remote.layout, dst_range, src_range, tnpl, "dst", "src"
        )
        args.same_length(op, "src_blocks", src, "dst_blocks", dst)
        args.check_blocks_in_range(op, "src_blocks", src, remote.layout.units)
        args.check_blocks_in_range(op, "dst_blocks", dst, local.layout.units)
        self._check_block_bytes(op, local.layout, remote.layout)
        plan = functools.partial(
            block_pieces, dst_bases, src_bases, dst, src, local.layout.unit_bytes, self._scratch
        )
        size = dst.size * dst_bases.size * local.layout.unit_bytes
        await self._transfer(op, link, local, remote, plan, write=False, nbytes_hint=size)

    async def push_blocks(
        self,
        dst_cache_key: BlocksCacheKey,
        src_cache: Cache,
        src_blocks: list[int] | tuple[int, ...] = (),
        dst_blocks: list[int] | tuple[int, ...] = (),
        src_layer_range: range | None = None,
        dst_layer_range: range | None = None,
        tensor_num_per_layer: int = 2,
    ) -> None:
        """Copy local blocks ``src_blocks[i]`` of ``src_cache`` into blocks ``dst_blocks[i]`` of
        the peer's cache bound to ``dst_cache_key`` (all layers, or the given layer ranges)."""
        op = "push_blocks"
        check_isinstance("dst_cache_key", dst_cache_key, BlocksCacheKey, allow_none=False)
        args.check_cache_arg(op, "src_cache", src_cache)
        if not src_cache.is_blocks_cache:
            raise args.param_invalid(op, "src_cache must be a blocks cache")
        src = args.block_list(op, "src_blocks", src_blocks)
        dst = args.block_list(op, "dst_blocks", dst_blocks)
        if dst.size == 0:
            raise args.param_invalid(op, "dst_blocks must not be empty")
        args.check_tensor_num_per_layer(op, tensor_num_per_layer)
        args.check_ranges(op, src_layer_range, dst_layer_range)
        args.same_length(op, "src_blocks", src, "dst_blocks", dst)
        self._require_running(op)
        link = self._link_for(op, dst_cache_key.cluster_id)
        local = self._local_for(op, src_cache)
        remote = self._remote_blocks(op, link, dst_cache_key)
        src_bases, dst_bases = self._select(
            op,
            local.layout,
            remote.layout,
            src_layer_range,
            dst_layer_range,
            tensor_num_per_layer,
            "src",
            "dst",
        )
        args.check_blocks_in_range(op, "src_blocks", src, local.layout.units)
        args.check_blocks_in_range(op, "dst_blocks", dst, remote.layout.units)
        self._check_block_bytes(op, local.layout, remote.layout)
        plan = functools.partial(
            block_pieces, dst_bases, src_bases, dst, src, local.layout.unit_bytes, self._scratch
        )
        size = dst.size * dst_bases.size * local.layout.unit_bytes
        await self._transfer(op, link, local, remote, plan, write=True, nbytes_hint=size)

    def _link_for(self, op: str, cluster_id: int) -> Link:
        if cluster_id == self._cluster_id:
            raise args.param_invalid(
                op, f"the cache key names this engine's own cluster {cluster_id}"
            )
        link = self._links.get(cluster_id)
        if link is None or link.closed:
            raise args.fail(op, Status.LLM_NOT_YET_LINK, f"cluster {cluster_id} is not linked")
        return link

    def _local_for(self, op: str, cache: Cache) -> LocalCache:
        entry = self._caches.get(cache.cache_id)
        if entry is None or entry.cache is not cache:
            raise args.fail(
                op,
                Status.LLM_KV_CACHE_NOT_EXIST,
                f"cache {cache.cache_id} is not registered with this engine",
            )
        return entry

    @staticmethod
    def _remote_blocks(op: str, link: Link, key: BlocksCacheKey) -> RemoteCache:
        remote = link.registry.blocks_by_model.get(key.model_id)
        if remote is None:
            raise args.fail(
                op,
                Status.LLM_KV_CACHE_NOT_EXIST,
                f"cluster {link.peer.cluster_id} has no remotely accessible blocks cache bound to "
                f"BlocksCacheKey(model_id={key.model_id}); the owner must register it with that "
                "key and remote_accessible=True",
            )
        return remote

    @staticmethod
    def _select(
        op: str,
        local: Layout,
        remote: Layout,
        local_range: range | None,
        remote_range: range | None,
        tnpl: int,
        local_side: str,
        remote_side: str,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Base addresses of the selected tensors on both sides (same count required)."""
        li = args.select_tensors(op, local_side, local.num_tensors, local_range, tnpl)
        ri = args.select_tensors(op, remote_side, remote.num_tensors, remote_range, tnpl)
        nl, nr = li.stop - li.start, ri.stop - ri.start
        if nl != nr:
            raise args.param_invalid(
                op,
                f"the {local_side} side selects {nl} tensors but the {remote_side} side "
                f"selects {nr}; layer ranges must cover the same number of tensors",
            )
        return local.addrs[li], remote.addrs[ri]

    @staticmethod
    def _check_block_bytes(op: str, local: Layout, remote: Layout) -> None:
        if local.unit_bytes != remote.unit_bytes:
            raise args.param_invalid(
                op,
                f"block sizes differ: local {local.unit_bytes} bytes, remote "
                f"{remote.unit_bytes} bytes",
            )

    async def _transfer(
        self,
        op: str,
        link: Link,
        local: LocalCache,
        remote: RemoteCache | list[RemoteCache],
        plan: Callable[[], Pieces],
        write: bool,
        nbytes_hint: int | None = None,
    ) -> None:
        """Plan (``plan()`` builds the pieces) and move one request on the executor, holding
        the link and every cache it touches in use until the native call returned.

        A request of at most ``inline_bytes`` (``nbytes_hint``) over a same-host transport runs
        on the loop thread instead: such a copy never waits on the peer and takes a few
        microseconds, less than the two thread wake-ups of the executor hop it saves."""
        remotes = remote if isinstance(remote, list) else [remote]
        usages = [link.usage, local.usage, *(r.usage for r in remotes)]
        stats, link_stats = (
            (self._push_stats, link.push) if write else (self._pull_stats, link.pull)
        )
        transport = link.transport
        move = transport.write if write else transport.read

        def plan_and_move() -> tuple[int, int]:
            pieces = plan()
            try:
                return move(pieces), pieces.count
            finally:
                pieces.release()

        inline = (
            nbytes_hint is not None
            and nbytes_hint <= self._opts.inline_bytes
            and isinstance(transport, CmaTransport)
            and self._take_inline_turn()
        )
        release = hold(usages)  # released by the native call's end, not the awaiting coroutine
        t0 = time.perf_counter()
        try:
            if inline:
                try:
                    nbytes, count = plan_and_move()
                finally:
                    release()
            else:
                nbytes, count = await self._run_native(plan_and_move, on_done=release)
        except (_ffi.NativeError, TransportClosed) as exc:
            err = self._transfer_error(op, link, exc)
            stats.record_error(err.status_code.name)
            link_stats.record_error(err.status_code.name)
            raise err from None
        elapsed = time.perf_counter() - t0
        stats.record(nbytes, count, elapsed)
        link_stats.record(nbytes, count, elapsed)

    def _transfer_error(self, op: str, link: Link, exc: Exception) -> LLMException:
        """Map a transport failure to the status the caller sees; a dead peer ends its link,
        a timeout does not (stance 9)."""
        peer = link.peer.cluster_id
        name = getattr(exc, "name", "")
        if isinstance(link.transport, Unreachable):
            return args.fail(op, Status.LLM_FEATURE_NOT_ENABLED, link.transport.reason)
        if isinstance(exc, TransportClosed) or name in ("DXL_E_SRCH", "DXL_E_PEER"):
            link.channel.close(f"peer {link.peer.address} (pid {link.peer.pid}) is gone")
            return args.fail(
                op, Status.LLM_LINK_FAILED, f"cluster {peer} (pid {link.peer.pid}) is gone: {exc}"
            )
        if name == "DXL_E_TIMEDOUT":
            return args.fail(
                op,
                Status.LLM_TIMEOUT,
                f"cluster {peer} did not complete the transfer within sync_kv_timeout "
                f"({self._opts.sync_kv_timeout_ms} ms): {exc}",
            )
        if name == "DXL_E_REMOTE":
            return args.fail(
                op,
                Status.LLM_KV_CACHE_NOT_EXIST,
                f"cluster {peer} refused the request (its registration changed): {exc}",
            )
        if name == "DXL_E_FAULT":
            return args.fail(
                op,
                Status.LLM_SUSPECT_REMOTE_ERROR,
                f"memory of cluster {peer} is no longer mapped where it was registered: {exc}",
            )
        return args.fail(op, Status.LLM_FAILED, f"transfer with cluster {peer} failed: {exc}")

    # ------------------------------------------------------------------ observability
    def stats(self) -> dict[str, Any]:
        """Counters of this engine: registrations, links and per-transport traffic."""
        counters = _ffi.ffi.new("dxl_counters_t *")
        _ffi.lib.dxl_counters(counters)
        transports: dict[str, int] = {}
        for link in self._links.values():
            transports[link.transport.name] = transports.get(link.transport.name, 0) + 1
        return {
            "cluster_id": self._cluster_id,
            "role": self._role.name,
            "state": self._state,
            "incarnation": self.incarnation,
            "listen": "{}:{}".format(*self.listen_address) if self.listen_address else None,
            "caches": len(self._caches),
            "registered_addrs": sum(e.layout.num_tensors for e in self._caches.values()),
            "links": {cid: link.snapshot() for cid, link in self._links.items()},
            "transports": transports,
            "pull": self._pull_stats.snapshot(),
            "push": self._push_stats.snapshot(),
            "data_server": self._data.stats() if self._data is not None else None,
            "native": {
                "regions_live": counters.regions_live,
                "peers_open": counters.peers_open,
                "ops_inflight": counters.ops_inflight,
                "bytes_registered": counters.bytes_registered,
            },
        }


def _overall(results: list[LLMStatusCode]) -> LLMStatusCode:
    return next((r for r in results if r != Status.LLM_SUCCESS), Status.LLM_SUCCESS)


__all__ = ["Engine"]
