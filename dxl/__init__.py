"""dxl: KV-cache transfer for disaggregated (prefill/decode) LLM serving.

``dxl.Engine`` is the asyncio API; ``dxl.LLMDataDist`` and its ``cache_manager`` are the
synchronous, LLM-DataDist-compatible API over the same engine (port code by changing
``import llm_datadist`` to ``import dxl``).
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

from .config import LLMConfig, LlmConfig
from .datadist import CacheManager, LLMDataDist
from .errors import LLMException, LLMStatusCode, Status
from .layers import Engine
from .types import (
    UINT64_MAX,
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    CacheTask,
    DataType,
    LayerSynchronizer,
    LLMClusterInfo,
    LLMRole,
    MemInfo,
    Memtype,
    Placement,
    RegisterMemStatus,
    TransferConfig,
    TransferWithCacheKeyConfig,
)

# The reference sets this on import for its runtime; kept for scripts that read it.
os.environ.setdefault("AUTO_USE_UC_MEMORY", "0")


def features() -> dict[str, Any]:
    """What this build and machine can do: transports available and the native version."""
    from . import _ffi
    from .transport.names import CMA, TCP

    return {
        "version": _ffi.ffi.string(_ffi.lib.DXL_VERSION).decode(),
        CMA: bool(_ffi.lib.DXL_HAS_CMA) and _ffi.lib.dxl_cma_self_test() == 0,
        TCP: True,  # the native data server and client are always built
        "cuda": False,
    }


__all__ = [
    "UINT64_MAX",
    "BlocksCacheKey",
    "Cache",
    "CacheDesc",
    "CacheKey",
    "CacheKeyByIdAndIndex",
    "CacheManager",
    "CacheTask",
    "DataType",
    "Engine",
    "LLMClusterInfo",
    "LLMConfig",
    "LLMDataDist",
    "LLMException",
    "LLMRole",
    "LLMStatusCode",
    "LayerSynchronizer",
    "LlmConfig",
    "MemInfo",
    "Memtype",
    "Placement",
    "RegisterMemStatus",
    "Status",
    "TransferConfig",
    "TransferWithCacheKeyConfig",
    "__version__",
    "features",
]
