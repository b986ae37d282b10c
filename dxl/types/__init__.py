"""Public data types of the LLM-DataDist v2 API (spec sections 2 and 4).

User input is validated here, once, with the reference's exception conventions
(see :mod:`dxl._validate`). The engine may trust what these constructors accept.

One module per kind of type; every name is importable from here as well:

- :mod:`.enums`: ``LLMRole``, ``Placement``, ``DataType``, ``RegisterMemStatus``, ``Memtype``;
- :mod:`.descriptors`: ``CacheDesc``, ``Cache``, ``MemInfo`` (what describes memory);
- :mod:`.keys`: ``CacheKey``, ``CacheKeyByIdAndIndex``, ``BlocksCacheKey``;
- :mod:`.cluster`: ``LLMClusterInfo`` and IP parsing (``parse_ip``, ``ip_to_str``,
  ``ipv6_or_none``);
- :mod:`.transfer`: ``transfer_cache_async``'s configs, ``LayerSynchronizer`` and ``CacheTask``.
"""

from __future__ import annotations

from dxl._validate import UINT64_MAX
from dxl.types.cluster import LLMClusterInfo
from dxl.types.cluster import ip_to_str as ip_to_str  # helpers, not in __all__ (as before)
from dxl.types.cluster import ipv6_or_none as ipv6_or_none
from dxl.types.cluster import parse_ip as parse_ip
from dxl.types.descriptors import MAX_SHAPE_RANK, Cache, CacheDesc, MemInfo
from dxl.types.enums import DataType, LLMRole, Memtype, Placement, RegisterMemStatus
from dxl.types.keys import BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex
from dxl.types.transfer import (
    CacheTask,
    LayerSynchronizer,
    TransferConfig,
    TransferWithCacheKeyConfig,
)

__all__ = [
    "MAX_SHAPE_RANK",
    "UINT64_MAX",
    "BlocksCacheKey",
    "Cache",
    "CacheDesc",
    "CacheKey",
    "CacheKeyByIdAndIndex",
    "CacheTask",
    "DataType",
    "LLMClusterInfo",
    "LLMRole",
    "LayerSynchronizer",
    "MemInfo",
    "Memtype",
    "Placement",
    "RegisterMemStatus",
    "TransferConfig",
    "TransferWithCacheKeyConfig",
]
