"""The cache book: an engine's registrations, their keys and generations, and their regions.

Every registration gets a cache id (from 1) and a generation that grows with every change peers
must see; only remotely accessible caches are advertised. Remotely accessible memory is also
entered in the engine's own region registry, which its tcp data server checks every request
against (and which no other engine's data server sees).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from ..errors import param_invalid
from ..memory.layout import Layout
from ..memory.regions import RegionRegistry
from ..memory.share import Window
from ..types import Cache, CacheDesc, CacheKey, Placement
from .keys import Binding, KeyTable
from .registry import LocalCache


class MemoryWatcher(Protocol):
    """Told of every registration's memory (the nixl transport's agent registers it too)."""

    def cache_added(
        self, cache_id: int, addrs: list[int], nbytes: int, placement: Placement, remote: bool
    ) -> None: ...

    def cache_removed(self, cache_id: int) -> None: ...

    def cache_info(self, cache_id: int) -> str: ...


class CacheBook:
    """The registrations of one engine (loop-side state: no thread touches it).

    Args:
        max_addrs: most tensor addresses registered at once (``dxl.MaxRegisterAddrs``).
        regions: the engine's region registry, where remotely accessible memory is entered.
        watcher: told of every registration's memory when it is added and once it is released
            (no transfer of this engine touches it any more).
    """

    def __init__(
        self,
        max_addrs: int,
        regions: RegionRegistry,
        watcher: MemoryWatcher | None = None,
        device_id: int = 0,
    ) -> None:
        self._max_addrs = max_addrs
        self._device_id = device_id  # of this engine's Placement.DEVICE caches, told to peers
        self._regions = regions
        self._watcher = watcher
        self._caches: dict[int, LocalCache] = {}
        self._by_model: dict[int, LocalCache] = {}  # blocks caches by BlocksCacheKey.model_id
        self.keys = KeyTable()
        self._next_id = 1
        self._gen = 0
        # Held while the registry changes and while a link handshake sends its snapshot: a new
        # peer sees every change exactly once, either in its snapshot or as a later message.
        self.lock = asyncio.Lock()

    def __iter__(self) -> Any:
        return iter(list(self._caches.values()))

    def __len__(self) -> int:
        return len(self._caches)

    @property
    def registered_addrs(self) -> int:
        return sum(e.layout.num_tensors for e in self._caches.values())

    def check(
        self,
        op: str,
        layout: Layout,
        model_id: int | None,
        cache_keys: list[CacheKey] | tuple[CacheKey, ...],
    ) -> list[Binding]:
        """The checks against the books; returns the key bindings to make (changes nothing)."""
        bindings = self.keys.plan_bindings(op, self._next_id, cache_keys, layout.units)
        in_use = self.registered_addrs
        if in_use + layout.num_tensors > self._max_addrs:
            raise param_invalid(
                op,
                f"registering {layout.num_tensors} more addresses would make "
                f"{in_use + layout.num_tensors}, over the limit of {self._max_addrs} registered "
                "addresses (LLMConfig.max_registered_addrs)",
            )
        if model_id is not None and model_id in self._by_model:
            other = self._by_model[model_id].cache.cache_id
            raise param_invalid(
                op, f"BlocksCacheKey model_id={model_id} is already bound to cache {other}"
            )
        return bindings

    def add(
        self,
        desc: CacheDesc,
        layout: Layout,
        *,
        owner: object,
        remote_accessible: bool,
        model_id: int | None,
        bindings: list[Binding],
        pool_addrs: list[int] | None,
        shared: list[Window],
    ) -> LocalCache:
        """Enter a checked registration (its regions too, if remotely accessible)."""
        cache = Cache(
            self._next_id,
            desc,
            [int(a) for a in layout.addrs.tolist()],
            owner,
            is_registered=pool_addrs is None,
            is_blocks_cache=layout.blocks,
            remote_accessible=remote_accessible,
        )
        if self._watcher is not None:  # first: a refusal leaves the books as they were
            self._watcher.cache_added(
                cache.cache_id,
                cache.tensor_addrs,
                layout.tensor_size,
                desc.placement,
                remote_accessible,
            )
        self._next_id += 1
        self._gen += 1
        entry = LocalCache(
            cache,
            layout,
            remote_accessible,
            model_id,
            self._gen,
            self._add_regions(layout) if remote_accessible else [],
            bindings=bindings,
            pool_addrs=pool_addrs,
            shared=shared,
            device=self._device_id if desc.placement == Placement.DEVICE else 0,
        )
        self.keys.bind(bindings, layout.num_tensors)
        self._caches[cache.cache_id] = entry
        if model_id is not None:
            self._by_model[model_id] = entry
        return entry

    def find(self, cache_id: int) -> LocalCache | None:
        return self._caches.get(cache_id)

    def entry(self, cache: Cache) -> LocalCache | None:
        """The registration behind a Cache object this engine returned, or None."""
        entry = self._caches.get(cache.cache_id)
        return entry if entry is not None and entry.cache is cache else None

    def take(self, entry: LocalCache) -> bool:
        """Take a registration out of the books (its regions stay until released: peers may
        still be using them). False if it was not there."""
        cache_id = entry.cache.cache_id
        if self._caches.get(cache_id) is not entry:
            return False
        del self._caches[cache_id]
        if entry.model_id is not None and self._by_model.get(entry.model_id) is entry:
            del self._by_model[entry.model_id]
        self.keys.drop_cache(cache_id)
        return True

    def bump(self, entry: LocalCache) -> None:
        """A new generation for an entry whose key bindings changed."""
        self._gen += 1
        entry.gen = self._gen

    def advertised(self) -> list[dict[str, Any]]:
        """The registry entries peers may see: remotely accessible caches only."""
        return [e.wire_entry() for e in self._caches.values() if e.remote_accessible]

    def clear(self) -> None:
        self._caches.clear()
        self._by_model.clear()

    def _add_regions(self, layout: Layout) -> list[int]:
        ids: list[int] = []
        try:
            for addr in layout.addrs.tolist():
                ids.append(self._regions.add(addr, layout.tensor_size))
        except BaseException:
            for rid in ids:  # all or nothing
                self._regions.remove(rid)
            raise
        return ids

    def release_regions(self, entry: LocalCache) -> None:
        """Remove the entry's regions: the data server refuses them from now on."""
        for rid in entry.region_ids:
            self._regions.remove(rid)
        entry.region_ids.clear()
        if self._watcher is not None:
            self._watcher.cache_removed(entry.cache.cache_id)

    def data_info(self, entry: LocalCache) -> str:
        """What a peer's transport needs to reach this entry's memory ("" for most)."""
        return self._watcher.cache_info(entry.cache.cache_id) if self._watcher else ""
