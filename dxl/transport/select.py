"""Choosing and opening the transport of a new link, and proving it reaches the right process.

The link asks for ``auto`` (the first transport in :data:`AUTO_ORDER` that both sides can use),
or names one (``dxl.Transport``: ``cma``, ``tcp``). Each candidate is opened and then proven: we
read the peer's 8-byte probe through it, whose token the peer sent in its hello, so a transport
that reaches another process (a reused pid, a wrong port) is refused. A new transport plugs in
by adding an :class:`Opener` here; the engine does not change.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..control.hello import PeerInfo
from ..errors import DxlError, LLMException, LLMStatusCode, fail
from ..memory.plan import Pieces
from .base import Transport, Unreachable, host_identity
from .cma import CmaTransport
from .tcp import TcpTransport

__all__ = ["AUTO_ORDER", "OPENERS", "OpenContext", "open_transport"]

log = logging.getLogger("dxl")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class OpenContext:
    """What opening a transport needs from the engine."""

    cluster_id: int  # this engine, for messages
    secret: str | None
    threads: int  # threads one request may split across
    timeout_ms: int  # bound of each transfer
    run: Callable[[Callable[[], Any]], Awaitable[Any]]  # runs a blocking call off the loop


@dataclass(frozen=True, slots=True)
class Opener:
    """How to open one kind of transport to a peer."""

    same_host_only: bool
    open: Callable[[PeerInfo, OpenContext], Awaitable[Transport]]


async def _open_cma(peer: PeerInfo, ctx: OpenContext) -> Transport:
    return CmaTransport(peer.pid, ctx.threads)


async def _open_tcp(peer: PeerInfo, ctx: OpenContext) -> Transport:
    if not peer.data_port:
        raise _NoDataServer
    transport: Transport = await ctx.run(
        functools.partial(
            TcpTransport,
            (peer.address, peer.data_port),
            ctx.secret,
            expect_instance=peer.incarnation,
            timeout_ms=ctx.timeout_ms,
        )
    )
    return transport


class _NoDataServer(DxlError):
    """The peer runs no data server (it does not listen)."""


OPENERS: dict[str, Opener] = {
    "cma": Opener(same_host_only=True, open=_open_cma),
    "tcp": Opener(same_host_only=False, open=_open_tcp),
}
AUTO_ORDER = ("cma", "tcp")


async def open_transport(peer: PeerInfo, choice: str, ctx: OpenContext) -> Transport:
    """Open and prove the transport to ``peer`` (``choice``: ``auto`` or a name in
    :data:`OPENERS`).

    Returns :class:`Unreachable` when no transport can reach the peer but the peer can still
    reach us (it runs no data server and shares no host with us).

    Raises:
        LLMException: ``LLM_LINK_FAILED`` when the chosen transport cannot be opened or
            proven.
    """
    same_host = peer.host == host_identity()
    names = AUTO_ORDER if choice == "auto" else (choice,)
    errors: list[str] = []
    no_data_server = False
    for name in names:
        opener = OPENERS[name]
        if opener.same_host_only and not same_host:
            if choice != "auto":
                raise _link_failed(
                    f"transport {name} was asked for, but cluster {peer.cluster_id} runs on "
                    "another host or pid namespace"
                )
            continue
        try:
            return await _proven(peer, await opener.open(peer, ctx), ctx)
        except _NoDataServer:
            no_data_server = True
        except (DxlError, OSError, LLMException) as exc:  # AuthError, NativeError are DxlErrors
            if choice != "auto" or name == names[-1]:
                where = f"at {peer.address}:{peer.data_port} " if name == "tcp" else ""
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


async def _proven(peer: PeerInfo, transport: Transport, ctx: OpenContext) -> Transport:
    """Read the peer's probe through ``transport``; the token proves the right process."""
    got = np.zeros(1, dtype=np.uint64)
    addr, token = peer.probe
    probe = Pieces(
        np.array([got.ctypes.data], dtype=np.uint64),
        np.array([addr], dtype=np.uint64),
        np.array([8], dtype=np.uint64),
    )
    try:
        await ctx.run(functools.partial(transport.read, probe))
    except BaseException:
        transport.close()
        raise
    if int(got[0]) != token:
        transport.close()
        raise _link_failed(
            f"the {transport.name} peer is not the process of cluster {peer.cluster_id} "
            "(probe mismatch)"
        )
    return transport


def _link_failed(message: str) -> LLMException:
    return fail("link_clusters", LLMStatusCode.LLM_LINK_FAILED, message)
