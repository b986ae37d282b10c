"""Choosing and opening the transport of a new link, and proving it reaches the right process.

The link asks for ``auto`` (the first transport in :data:`AUTO_ORDER` that can reach the peer), or
names one (``dxl.Transport``: ``cma``, ``tcp``, or ``nixl``, which ``auto`` never tries). A
same-host transport is tried only towards a process the kernel proved to be the peer (its pid holds
the other end of the link's control connection; never this very process): a peer's declared pid or
host decides nothing, and we read the peer's 8-byte probe through it to check the data path. tcp
streams are opened and authenticated with the link's own key, which proves the data server is the
peer's. All of it runs on the event loop within the link's deadline (a cma probe read never waits
on the peer; tcp streams open asynchronously): no thread waits on a silent or slow peer, and the
engine's transfer workers are never used. A new transport plugs in by adding an :class:`Opener`
here; the engine does not change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..control.hello import PeerInfo
from ..errors import DxlError, LLMException, LLMStatusCode, fail
from ..memory.plan import Pieces
from .base import TransferTimeout, Transport, Unreachable
from .cma import CmaTransport
from .names import ALL, AUTO, AUTO_ORDER, CMA, NIXL, TCP
from .nixl import NixlHost, open_nixl
from .tcp import DEFAULT_STREAMS, TcpTransport, open_streams

if TYPE_CHECKING:
    from ..memory.regions import RegionRegistry

__all__ = ["AUTO_ORDER", "OPENERS", "OpenContext", "TransportBackend", "open_transport"]

log = logging.getLogger("dxl")


@dataclass(frozen=True, slots=True)
class OpenContext:
    """What opening a transport needs from the link being set up."""

    cluster_id: int  # this engine, for messages
    pid: int  # the peer's pid as the kernel proved it; 0: not proven (no same-host transport)
    key_id: bytes  # the link's data key (tcp data connections authenticate with it)
    key: bytes
    threads: int  # threads one request may split across
    timeout_ms: int  # bound of each later transfer
    deadline: float  # loop time by which the link must be up
    nixl: NixlHost | None = None  # the engine's NIXL agent (dxl.Transport=nixl only)

    def left_s(self) -> float:
        """Seconds left before the deadline (TransferTimeout when none)."""
        left = self.deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TransferTimeout("the link's timeout expired while opening its transport")
        return left


@dataclass(frozen=True, slots=True)
class Opener:
    """How to open one kind of transport to a peer."""

    same_host_only: bool
    open: Callable[[PeerInfo, OpenContext], Awaitable[Transport]]


async def _open_cma(peer: PeerInfo, ctx: OpenContext) -> Transport:
    transport = CmaTransport(ctx.pid, ctx.threads)
    try:
        _check_probe(peer, transport)
    except BaseException:
        transport.close()
        raise
    return transport


async def _open_tcp(peer: PeerInfo, ctx: OpenContext) -> Transport:
    if not peer.data_port:
        raise _NoDataServer
    address = (peer.address, peer.data_port)
    streams = await open_streams(
        address, ctx.key, ctx.key_id, peer.incarnation, DEFAULT_STREAMS, ctx.left_s()
    )
    return TcpTransport(
        address,
        ctx.key,
        key_id=ctx.key_id,
        expect_instance=peer.incarnation,
        timeout_ms=ctx.timeout_ms,
        first_streams=streams,
    )


async def _open_nixl(peer: PeerInfo, ctx: OpenContext) -> Transport:
    # the engine's first nixl link makes its agent (UCX start-up: a blocking call of ~0.1 s), so
    # off the loop; it never waits on the peer
    async with asyncio.timeout(ctx.left_s()):
        return await asyncio.to_thread(
            open_nixl, ctx.nixl, peer.cluster_id, peer.incarnation, peer.probe, ctx.timeout_ms
        )


class _NoDataServer(DxlError):
    """The peer runs no data server (it does not listen)."""


OPENERS: dict[str, Opener] = {
    CMA: Opener(same_host_only=True, open=_open_cma),
    TCP: Opener(same_host_only=False, open=_open_tcp),
    NIXL: Opener(same_host_only=False, open=_open_nixl),  # never tried by auto
}
# every opener has its name in names.py (which the option table reads), and only those
assert set(OPENERS) == set(ALL), "transport/names.py and OPENERS disagree"


class TransportBackend(Protocol):
    """A data path given to one engine (``Engine(..., transport_backend=...)``) that opens
    every transport of its links instead of :data:`OPENERS`, as httpcore takes a network
    backend: :class:`~dxl.transport.inprocess.InProcessBackend` (tests). Never chosen by
    ``auto``."""

    def attach(self, cluster_id: int, incarnation: str, regions: RegionRegistry) -> None:
        """The engine starts using it; ``regions`` is what peers may read and write."""

    def detach(self) -> None:
        """The engine closes."""

    async def open(self, peer: PeerInfo, ctx: OpenContext) -> Transport:
        """The transport to ``peer`` (raises a DxlError when it cannot be reached)."""


async def open_transport(
    peer: PeerInfo, choice: str, ctx: OpenContext, backend: TransportBackend | None = None
) -> Transport:
    """Open and prove the transport to ``peer`` (``choice``: ``auto`` or a name in
    :data:`OPENERS`; an injected ``backend`` opens it instead).

    Returns :class:`Unreachable` when no transport can reach the peer but the peer can still
    reach us (it runs no data server and is not a proven process of this host).

    Raises:
        LLMException: ``LLM_LINK_FAILED`` when the chosen transport cannot be opened or
            proven in time.
    """
    if backend is not None:
        try:
            return await backend.open(peer, ctx)
        except DxlError as exc:
            raise _link_failed(f"{type(backend).__name__}: {exc}") from exc
    names = AUTO_ORDER if choice == AUTO else (choice,)
    errors: list[str] = []
    no_data_server = False
    for name in names:
        opener = OPENERS[name]
        if opener.same_host_only and not ctx.pid:
            if choice != AUTO:
                raise _link_failed(
                    f"transport {name} was asked for, but cluster {peer.cluster_id} is not a "
                    "process of this host (as the kernel sees it), or it is this very process"
                )
            continue
        try:
            return await opener.open(peer, ctx)
        except _NoDataServer:
            no_data_server = True
        except (DxlError, OSError, LLMException) as exc:  # AuthError, NativeError: DxlErrors
            if choice != AUTO or name == names[-1]:
                where = f"at {peer.address}:{peer.data_port} " if name == TCP else ""
                raise _link_failed(
                    f"{name} to cluster {peer.cluster_id} {where}failed: {exc}"
                    + (f" (and {errors[0]})" if errors else "")
                ) from exc
            errors.append(f"{name}: {exc}")
    if not no_data_server:
        raise _link_failed(f"no transport reaches cluster {peer.cluster_id}: {errors}")
    reason = f"cluster {peer.cluster_id} does not listen, so it has no data server" + (
        f" ({errors[0]})" if errors else ""
    )
    log.info("dxl: %s; it can still pull from and push to cluster %d", reason, ctx.cluster_id)
    return Unreachable(reason)


def _check_probe(peer: PeerInfo, transport: Transport) -> None:
    """Read the peer's probe through a same-host transport (on the loop: the copy never waits on
    the peer): the data path works and the process holds the token it announced."""
    got = np.zeros(1, dtype=np.uint64)
    addr, token = peer.probe
    probe = Pieces(
        np.array([got.ctypes.data], dtype=np.uint64),
        np.array([addr], dtype=np.uint64),
        np.array([8], dtype=np.uint64),
    )
    transport.read(probe)
    if int(got[0]) != token:
        raise _link_failed(
            f"the {transport.name} peer is not the process of cluster {peer.cluster_id} "
            "(probe mismatch)"
        )


def _link_failed(message: str) -> LLMException:
    return fail("link_clusters", LLMStatusCode.LLM_LINK_FAILED, message)
