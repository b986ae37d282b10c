"""The resolve step every transfer starts with: from the caller's keys and caches to a route.

Each operation does *resolve -> plan -> move*: resolve (here) finds the live link, the local
registration and the peer's advertised cache, and the tensors a layer selection names on both
sides, refusing anything that does not fit before a byte moves; plan builds the pieces
(:mod:`dxl.memory.plan`); move runs them (:class:`~dxl.engine.mover.Mover`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._validate import is_valid_id, select_tensors
from ..errors import LLMStatusCode, fail, param_invalid
from ..memory.layout import Layout
from ..types import BlocksCacheKey, Cache, CacheKey, CacheKeyByIdAndIndex
from .book import CacheBook
from .keys import index_of
from .link import Link
from .links import LinkTable
from .registry import LocalCache, RemoteCache
from .state import RunState

KeyRow = list[int]  # [req_id, model_id, prefix_id, batch]: a bound key as the wire carries it


@dataclass(slots=True)
class Route:
    """Where one request goes: the link, our cache, and the peer's cache(s) it touches."""

    link: Link
    local: LocalCache
    remotes: list[RemoteCache] = field(default_factory=list)

    @property
    def remote(self) -> RemoteCache:
        return self.remotes[0]


class Resolver:
    """Looks up links and caches for the operations, with their errors."""

    def __init__(self, state: RunState, book: CacheBook, links: LinkTable) -> None:
        self._state = state
        self._book = book
        self._links = links

    def local(self, op: str, cache: Cache) -> LocalCache:
        """The registration behind a Cache this engine returned."""
        entry = self._book.entry(cache)
        if entry is None:
            raise fail(
                op,
                LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                f"cache {cache.cache_id} is not registered with this engine",
            )
        return entry

    def route(self, op: str, cluster_id: int, cache: Cache) -> Route:
        """The engine runs, ``cluster_id`` is linked, ``cache`` is ours: a route without its
        remote side yet."""
        self._state.require(op)
        link = self._links.route(op, cluster_id)
        return Route(link, self.local(op, cache))

    def blocks(self, op: str, key: BlocksCacheKey, cache: Cache) -> Route:
        """Route to the peer's blocks cache bound to ``key``."""
        route = self.route(op, key.cluster_id, cache)
        route.remotes.append(self.remote_blocks(op, route.link, key))
        return route

    @staticmethod
    def remote_blocks(op: str, link: Link, key: BlocksCacheKey) -> RemoteCache:
        """The peer's blocks cache bound to ``key``."""
        remote = link.registry.blocks_by_model.get(key.model_id)
        if remote is None:
            raise fail(
                op,
                LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                f"cluster {link.peer.cluster_id} has no remotely accessible blocks cache bound "
                f"to BlocksCacheKey(model_id={key.model_id}); the owner must register it with "
                "that key and remote_accessible=True",
            )
        return remote

    def batch(
        self, op: str, key: CacheKey | CacheKeyByIdAndIndex, cache: Cache
    ) -> tuple[Route, int, KeyRow | None]:
        """Route to the peer's contiguous cache a key names; also the batch, and the bound key
        the owner may consume after a pull (None: nothing to consume)."""
        route = self.route(op, key.cluster_id, cache)
        remote, batch, bound = self.remote_batch(op, route.link, key)
        route.remotes.append(remote)
        return route, batch, bound

    @staticmethod
    def remote_batch(
        op: str, link: Link, key: CacheKey | CacheKeyByIdAndIndex
    ) -> tuple[RemoteCache, int, KeyRow | None]:
        """The peer's contiguous cache and batch a key names, and the bound key to consume."""
        peer = link.peer.cluster_id
        if isinstance(key, CacheKeyByIdAndIndex):
            remote = link.registry.caches.get(key.cache_id)
            if remote is None or remote.layout.blocks:
                raise fail(
                    op,
                    LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                    f"cluster {peer} has no remotely accessible contiguous cache "
                    f"{key.cache_id}; the owner must register it with remote_accessible=True",
                )
            if key.batch_index >= remote.layout.units:
                raise fail(
                    op,
                    LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                    f"cache {key.cache_id} of cluster {peer} has {remote.layout.units} batches, "
                    f"not {key.batch_index + 1}",
                )
            bound = next(
                (k for k in remote.keys if k[3] == key.batch_index and not is_valid_id(k[2])),
                None,
            )
            return remote, key.batch_index, bound
        found = link.registry.by_key.get(index_of(key))
        if found is None:
            raise fail(
                op,
                LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                f"cluster {peer} has no remotely accessible cache bound to {key!r}",
            )
        remote, batch = found
        bound = (
            None if is_valid_id(key.prefix_id) else [key.req_id, key.model_id, key.prefix_id, batch]
        )
        return remote, batch, bound


def select(
    op: str,
    local: Layout,
    remote: Layout,
    local_range: range | None,
    remote_range: range | None,
    tnpl: int,
    local_side: str,
    remote_side: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Base addresses of the tensors a layer selection names on both sides (same count)."""
    li = select_tensors(op, local_side, local.num_tensors, local_range, tnpl)
    ri = select_tensors(op, remote_side, remote.num_tensors, remote_range, tnpl)
    nl, nr = li.stop - li.start, ri.stop - ri.start
    if nl != nr:
        raise param_invalid(
            op,
            f"the {local_side} side selects {nl} tensors but the {remote_side} side "
            f"selects {nr}; layer ranges must cover the same number of tensors",
        )
    return local.addrs[li], remote.addrs[ri]


def check_block_bytes(op: str, local: Layout, remote: Layout) -> None:
    if local.unit_bytes != remote.unit_bytes:
        raise param_invalid(
            op,
            f"block sizes differ: local {local.unit_bytes} bytes, remote {remote.unit_bytes} bytes",
        )
