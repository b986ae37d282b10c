"""CacheKey bindings: which batch of which contiguous cache a key names.

On the owner, a ``CacheKey`` is indexed by ``(req_id, model_id)`` or, for a prefix key, by
``(prefix_id, model_id)`` in a separate namespace; the key's ``cluster_id`` only routes pulls.
Bindings travel to peers inside registry entries as ``[req_id, model_id, prefix_id, batch]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._validate import check_cache_key, is_valid_id
from ..errors import param_invalid
from ..types import CacheKey

KeyIndex = tuple[str, int, int]  # ("req" | "prefix", id, model_id)


def key_index(req_id: int, model_id: int, prefix_id: int) -> KeyIndex:
    if is_valid_id(prefix_id):
        return ("prefix", prefix_id, model_id)
    return ("req", req_id, model_id)


def index_of(key: CacheKey) -> KeyIndex:
    return key_index(key.req_id, key.model_id, key.prefix_id)


def is_placeholder(key: CacheKey) -> bool:
    """A key with neither id set marks an unused batch slot when binding."""
    return not is_valid_id(key.req_id) and not is_valid_id(key.prefix_id)


@dataclass(slots=True)
class Binding:
    """One key bound to one batch; ``pulled`` tracks tensors already pulled (layer-wise pulls
    consume the key once every tensor of the batch was pulled)."""

    cache_id: int
    batch: int
    key: CacheKey
    pulled: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def wire(self) -> list[int]:
        return [self.key.req_id, self.key.model_id, self.key.prefix_id, self.batch]


class KeyTable:
    """The owner's key bindings, engine-wide (a key is bound at most once per engine)."""

    def __init__(self) -> None:
        self._by_index: dict[KeyIndex, Binding] = {}

    def plan_bindings(
        self, op: str, cache_id: int, keys: list[CacheKey] | tuple[CacheKey, ...], batches: int
    ) -> list[Binding]:
        """Check ``keys`` (key i binds batch i) and return the bindings, changing nothing."""
        if len(keys) > batches:
            raise param_invalid(
                op, f"cache_keys has {len(keys)} keys but the cache has only {batches} batches"
            )
        bindings: list[Binding] = []
        seen: set[KeyIndex] = set()
        for batch, key in enumerate(keys):
            if is_placeholder(key):
                continue
            check_cache_key(op, key)
            idx = index_of(key)
            if idx in seen:
                raise param_invalid(op, f"cache_keys[{batch}] {key!r} appears twice")
            if idx in self._by_index:
                raise param_invalid(op, f"cache_keys[{batch}] {key!r} is already bound")
            seen.add(idx)
            bindings.append(Binding(cache_id, batch, key))
        return bindings

    def bind(self, bindings: list[Binding], num_tensors: int) -> None:
        for b in bindings:
            b.pulled = np.zeros(num_tensors, dtype=bool)
            self._by_index[index_of(b.key)] = b

    def get(self, key: CacheKey) -> Binding | None:
        return self._by_index.get(index_of(key))

    def for_cache(self, cache_id: int) -> list[Binding]:
        return [b for b in self._by_index.values() if b.cache_id == cache_id]

    def remove(self, binding: Binding) -> None:
        if self._by_index.get(index_of(binding.key)) is binding:
            del self._by_index[index_of(binding.key)]

    def drop_cache(self, cache_id: int) -> None:
        for b in self.for_cache(cache_id):
            self.remove(b)
