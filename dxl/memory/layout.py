"""The byte layout of a cache, and the checks that turn a user's description into one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _ffi
from ..errors import LLMStatusCode, fail, param_invalid
from ..types import CacheDesc, Placement

_MAX_ADDR = (1 << 64) - 1


@dataclass(slots=True)
class Layout:
    """Byte layout shared by local and remote caches: ``num_tensors`` tensors of ``tensor_size``
    bytes each at ``addrs``, cut into ``units`` equal units (blocks, or batches)."""

    addrs: np.ndarray  # uint64, one base address per tensor
    tensor_size: int
    units: int
    blocks: bool

    @property
    def num_tensors(self) -> int:
        return int(self.addrs.size)

    @property
    def unit_bytes(self) -> int:
        return self.tensor_size // self.units

    def holds(self, addr: int, length: int) -> bool:
        """True if ``[addr, addr + length)`` lies inside one of the tensors."""
        ends = self.addrs + np.uint64(self.tensor_size)
        return bool(np.any((self.addrs <= addr) & (ends >= np.uint64(addr + length))))


def layout_of(
    op: str, desc: CacheDesc, addrs: list[int], blocks: bool, *, device: bool = False
) -> Layout:
    """Check a cache description and its addresses and return their layout. ``device``: the
    engine can move ``Placement.DEVICE`` memory (its transport is nixl); else it is refused."""
    if desc.placement != Placement.HOST and not device:
        raise fail(
            op,
            LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
            "Placement.DEVICE needs the nixl transport (dxl.Transport=nixl): only NIXL's agent "
            "moves device memory in this build",
        )
    if desc.num_tensors == 0 or len(addrs) != desc.num_tensors:
        raise param_invalid(
            op,
            f"addrs must hold one address per tensor: cache_desc.num_tensors is "
            f"{desc.num_tensors}, len(addrs) is {len(addrs)}",
        )
    size = desc.size
    units = int(desc.shape[0])
    if size <= 0 or units <= 0 or size % units:
        raise param_invalid(
            op, f"cache_desc shape {list(desc.shape)} gives no whole blocks/batches on dim 0"
        )
    for i, addr in enumerate(addrs):
        if addr <= 0 or addr + size > _MAX_ADDR:
            raise param_invalid(op, f"addrs[{i}]={addr} is not a valid address")
    return Layout(np.asarray(addrs, dtype=np.uint64), size, units, blocks)


def check_mapped(op: str, layout: Layout) -> None:
    """Refuse addresses this process cannot read: a peer must never be sent to them."""
    first = layout.addrs
    last = layout.addrs + np.uint64(layout.tensor_size - 1)
    ends = np.concatenate([first, last])
    if _ffi.lib.dxl_check_readable(_ffi.as_u64_ptr(ends), 2 * layout.num_tensors) < 0:
        raise param_invalid(
            op, "addrs must point to mapped memory of this process of cache_desc.size bytes"
        )
