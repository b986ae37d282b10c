"""The transports a transport-generic test runs over, as pytest params, and the engine options
that select each.

A test about behaviour (bytes moved, layer ranges, the handoff, the sync facade, a peer's death,
a deadline, unregistering under a transfer) takes a ``transport`` param from here instead of
naming one, so ``make test-nixl`` runs the same test over ``nixl``: the ``nixl`` param carries
the ``nixl`` marker and skips, with a reason, where nixl is not installed (``make test``).
Nothing here imports nixl (``dxl.transport.nixl`` reads only its package metadata)."""

from __future__ import annotations

from typing import Any

import pytest
from waiting import ops_inflight

from dxl.transport.nixl import nixl_version

# This machine has no RDMA device: UCX emulates RMA, which a pair must allow explicitly
# (docs/security.md, "A linked NIXL peer").
NIXL_OPTIONS = {"dxl.Transport": "nixl", "dxl.NixlAllowEmulated": "1"}

NIXL = pytest.param(
    "nixl",
    marks=[
        pytest.mark.nixl,
        pytest.mark.skipif(
            nixl_version() is None, reason="nixl is not installed (make test-nixl runs it)"
        ),
    ],
)


def params(*names: str) -> list[object]:
    """The params of a transport-generic test: ``names`` (e.g. "cma", "tcp", "shared") and
    nixl."""
    return [*names, NIXL]


def transport_options(transport: str) -> dict[str, str]:
    """Engine options selecting ``transport``; "shared" is cma where the prefill moved its
    registered memory onto memfds (dxl.ShareRegistered), which the decode maps (cma+shm);
    "cma" is the cma syscalls alone (dxl.ShareRegistered 0: unset, dxl would share memory
    nothing can have pinned, tests/test_share_default.py)."""
    if transport == "nixl":
        return dict(NIXL_OPTIONS)
    if transport == "shared":
        return {"dxl.Transport": "cma", "dxl.ShareRegistered": "1"}
    if transport == "cma":
        return {"dxl.Transport": "cma", "dxl.ShareRegistered": "0"}
    return {"dxl.Transport": transport}


def link_name(transport: str) -> str:
    """The transport a link reports (``stats()["links"][id]["transport"]``) once up."""
    return "cma+shm" if transport == "shared" else transport


def in_flight(eng: Any) -> int:
    """Copies of ``eng`` under way now: native ones (cma, memcpy, tcp: the process's counter)
    and transfers posted to its NIXL agent (for ``waiting.start_until_in_flight``)."""
    host = getattr(eng, "_nixl", None)
    return ops_inflight() + (host.transfers_in_flight if host is not None else 0)
