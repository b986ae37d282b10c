"""Whether our cache fits a ticket: the check the engine that takes a ticket (a fetch's
destination, a push's source) makes before anything moves, so a mismatch is a parameter error
here rather than a failed copy on the other engine."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validate import check_blocks_in_range
from ..errors import param_invalid
from .port import LocalCache
from .ticket import Ticket


def check_destination(
    op: str, entry: LocalCache, blocks: np.ndarray, t: Ticket, *, tail: bool = False
) -> None:
    """Our side of a handoff must match the ticket: one block per offered block (``tail``: per
    offered block of the last ones, at least one), same block size, enough tensors for the
    layers."""
    if tail and 0 < blocks.size < len(t.block_ids):
        pass
    elif blocks.size != len(t.block_ids):
        raise param_invalid(
            op, f"block_ids must name {len(t.block_ids)} blocks (one per offered block)"
        )
    check_blocks_in_range(op, "block_ids", blocks, entry.layout.units)
    if entry.layout.unit_bytes != t.block_bytes:
        raise param_invalid(
            op, f"block sizes differ: here {entry.layout.unit_bytes}, offered {t.block_bytes}"
        )
    stop = t.layers[1] if t.layers is not None else t.num_tensors // t.tensors_per_layer
    if entry.layout.num_tensors < stop * t.tensors_per_layer:
        raise param_invalid(op, f"the cache has fewer tensors than the offer's layers (to {stop})")


def offer_view(t: Ticket) -> dict[str, Any]:
    """What a claim or a fetch says the offer is, from its ticket (``wire`` fields): the offerer
    refuses one that differs from its own record of the offer."""
    return {
        "layers": list(t.layers) if t.layers is not None else [],
        "tensors_per_layer": t.tensors_per_layer,
        "block_bytes": t.block_bytes,
        "num_tensors": t.num_tensors,
    }
