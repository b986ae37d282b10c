"""Caches known to an engine: its own registrations and the ones peers advertise to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LLMStatusCode, fail
from ..memory.layout import Layout
from ..memory.share import Window
from ..types import Cache, Placement
from .keys import Binding, KeyIndex, key_index
from .usage import Usage

# What one peer may advertise on one link: caches, and addresses, key bindings and shared
# windows of them all together (each costs us memory). A real engine advertises a few caches
# of tens to hundreds of tensors; over the bound a registration is refused, nothing stored.
MAX_PEER_CACHES = 1024
MAX_PEER_ITEMS = 1 << 18


@dataclass(slots=True)
class LocalCache:
    """One registration of this engine."""

    cache: Cache
    layout: Layout
    remote_accessible: bool
    model_id: int | None  # BlocksCacheKey bound to a blocks cache
    gen: int
    region_ids: list[int]
    usage: Usage = field(default_factory=Usage)
    bindings: list[Binding] = field(default_factory=list)  # CacheKeys bound to its batches
    pool_addrs: list[int] | None = None  # allocated from a pool (freed by the engine)
    deallocated: bool = False  # deallocate_cache was called; freed once no key is bound
    shared: list[Window] = field(default_factory=list)  # pages moved onto memfds (dxl.share)
    device: int = 0  # the CUDA device of a Placement.DEVICE cache (peers' NIXL needs it)

    def wire_entry(self) -> dict[str, Any]:
        """The registry entry peers receive (only for remotely accessible caches)."""
        desc = self.cache.cache_desc
        return {
            "id": self.cache.cache_id,
            "gen": self.gen,
            "blocks": self.layout.blocks,
            "num_tensors": self.layout.num_tensors,
            "tensor_size": self.layout.tensor_size,
            "units": self.layout.units,
            "placement": int(desc.placement),
            "device": self.device,
            "addrs": [int(a) for a in self.layout.addrs],
            "model_id": self.model_id,
            "keys": [b.wire() for b in self.bindings],
            "shm": [w.wire() for w in self.shared],
        }


@dataclass(slots=True)
class RemoteCache:
    """A cache a peer advertised as remotely accessible."""

    cache_id: int
    gen: int
    layout: Layout
    model_id: int | None
    keys: list[list[int]] = field(default_factory=list)  # [req_id, model_id, prefix_id, batch]
    shm: list[list[int]] = field(default_factory=list)  # [fd, offset, base, size, ino] (share.py)
    usage: Usage = field(default_factory=Usage)
    placement: Placement = Placement.HOST  # DEVICE: only a nixl link moves it
    device: int = 0  # the peer's device of a DEVICE cache (NIXL matches it on the peer)

    @classmethod
    def from_wire(cls, entry: dict[str, Any]) -> RemoteCache:
        layout = Layout(
            addrs=np.asarray(entry["addrs"], dtype=np.uint64),
            tensor_size=entry["tensor_size"],
            units=entry["units"],
            blocks=entry["blocks"],
        )
        return cls(
            entry["id"],
            entry["gen"],
            layout,
            entry["model_id"],
            entry["keys"],
            entry["shm"],
            placement=Placement(entry["placement"]),
            device=entry["device"],
        )


class RemoteRegistry:
    """What one peer advertised: caches by id and blocks caches by BlocksCacheKey.model_id."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.caches: dict[int, RemoteCache] = {}
        self.blocks_by_model: dict[int, RemoteCache] = {}
        self.by_key: dict[KeyIndex, tuple[RemoteCache, int]] = {}
        self.items = 0  # addresses, key bindings and shared windows of all its caches
        for entry in entries:
            self.add(entry)

    def add(self, entry: dict[str, Any]) -> None:
        """Record an advertised (schema-checked) cache, replacing one of the same id; over the
        per-link bounds it is refused (LLMException) and nothing changes."""
        old = self.caches.get(entry["id"])
        items = self.items - (_items(old) if old is not None else 0)
        items += len(entry["addrs"]) + len(entry["keys"]) + len(entry["shm"])
        caches = len(self.caches) + (old is None)
        if caches > MAX_PEER_CACHES or items > MAX_PEER_ITEMS:
            raise fail(
                "reg_add",
                LLMStatusCode.LLM_OUT_OF_MEMORY,
                f"a peer may advertise at most {MAX_PEER_CACHES} caches of {MAX_PEER_ITEMS} "
                "addresses, key bindings and shared windows in all",
            )
        if old is not None:
            self._drop(old)
        self.items = items
        cache = RemoteCache.from_wire(entry)
        self.caches[cache.cache_id] = cache
        if cache.layout.blocks and cache.model_id is not None:
            self.blocks_by_model[cache.model_id] = cache
        for req_id, model_id, prefix_id, batch in cache.keys:
            self.by_key[key_index(req_id, model_id, prefix_id)] = (cache, batch)

    def remove(self, cache_id: int) -> RemoteCache | None:
        cache = self.caches.pop(cache_id, None)
        if cache is not None:
            self._drop(cache)
            self.items -= _items(cache)
        return cache

    def _drop(self, cache: RemoteCache) -> None:
        # transfers that already hold it finish (its usage counts them); new ones cannot find it
        if self.blocks_by_model.get(cache.model_id) is cache:  # type: ignore[arg-type]
            del self.blocks_by_model[cache.model_id]  # type: ignore[arg-type]
        for req_id, model_id, prefix_id, _ in cache.keys:
            idx = key_index(req_id, model_id, prefix_id)
            if self.by_key.get(idx, (None,))[0] is cache:
                del self.by_key[idx]

    def find(self, addr: int, length: int) -> RemoteCache | None:
        """The advertised cache one of whose tensors holds ``[addr, addr + length)``."""
        return next((c for c in self.caches.values() if c.layout.holds(addr, length)), None)


def _items(cache: RemoteCache) -> int:
    return int(cache.layout.addrs.size) + len(cache.keys) + len(cache.shm)
