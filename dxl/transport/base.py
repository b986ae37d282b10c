"""The one interface every data-path transport offers the engine, and the failures they share.

A transport moves a planned piece list between this process and one peer: blocking
``read(pieces)`` (remote -> local, a pull) and ``write(pieces)`` (local -> remote, a push), one
call per request, run on the engine's workers. Like UCX's UCT interfaces, each transport
declares what it can do (:class:`Capabilities`) and maps its own failures to dxl status codes
(:meth:`Transport.failure`); the engine never asks which concrete transport it holds. A missing
ability is a no-op default here (as UCT points a missing op at "unsupported"), never a type
check in the engine.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from .. import _ffi
from ..errors import DxlError, LLMStatusCode
from ..memory.layout import Layout
from ..memory.plan import Pieces
from ..types import Placement

__all__ = [
    "BlockMove",
    "Capabilities",
    "Failure",
    "Job",
    "PeerGone",
    "TransferTimeout",
    "Transport",
    "TransportClosed",
    "Unreachable",
    "host_identity",
]

Job = Callable[[], bool]
"""Background work a transport asks the engine to run on its workers (e.g. prefaulting a fresh
mapping), one job at a time in order, until a job returns False."""


class TransportClosed(DxlError):
    """The transport cannot be used: its link was torn down, or it never had a data path."""


class PeerGone(DxlError):
    """The peer cannot be reached any more: it closed or reset the connection, refused a new
    one, or is another process than the one linked (it restarted)."""


class TransferTimeout(DxlError):
    """A transfer (or the connection it needed) did not complete within its timeout."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a transport can do; the engine decides by these, never by the transport's type.

    Attributes:
        same_host_only: works only between processes that share a kernel and pid namespace.
        maps_peer_memory: can map memory the peer shares through memfds, so pieces inside it
            are a memcpy (:meth:`Transport.share_windows` does something).
        inline: a small request may run on the event loop's own thread: it never waits on the
            peer (a copy of a few microseconds), so the executor hop would cost more.
        memory: the placements whose memory it moves.
        block_index: moves whole blocks by index (:meth:`Transport.move_blocks`) with lists
            it prepared once per cache, so a block request needs no planned pieces.
    """

    same_host_only: bool
    maps_peer_memory: bool
    inline: bool
    memory: frozenset[Placement]
    block_index: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class BlockMove:
    """Whole blocks between one of our caches and one of the peer's, by index: block
    ``local_blocks[i]`` of our tensor at ``local_bases[t]`` and block ``remote_blocks[i]`` of
    the peer's tensor at ``remote_bases[t]``, ``block_bytes`` each, for every i and t.

    Attributes:
        local_key, remote_key: the caches' ids (ours, the peer's).
        local_layout, remote_layout: their layouts.
        remote_placement: where the peer's cache lives (ours: the transport registered it).
        remote_device: the peer's device of a ``Placement.DEVICE`` cache (0 for host memory).
    """

    local_key: int
    local_layout: Layout
    remote_key: int
    remote_layout: Layout
    local_bases: np.ndarray
    remote_bases: np.ndarray
    local_blocks: np.ndarray
    remote_blocks: np.ndarray
    block_bytes: int
    remote_placement: Placement = Placement.HOST
    remote_device: int = 0


@dataclass(frozen=True, slots=True)
class Failure:
    """A transport failure, as the engine reports it.

    Attributes:
        code: the status the operation fails with.
        what: what happened, completing "cluster <id> ...": e.g. ``"is gone"``.
        peer_gone: the link is dead: the engine closes it.
    """

    code: LLMStatusCode
    what: str
    peer_gone: bool = False


class Transport(ABC):
    """A data path to one peer (see the module docstring). Thread-safe: the engine calls
    ``read``/``write`` from several workers at once."""

    caps: Capabilities

    @property
    @abstractmethod
    def name(self) -> str:
        """The transport's name in stats and logs (``cma``, ``cma+shm``, ``tcp``...)."""

    @abstractmethod
    def read(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        """Pull: ``pieces.src`` (the peer's memory) -> ``pieces.dst`` (ours). Bytes moved.
        ``timeout_ms`` bounds a transport that waits on the peer (None: its own bound)."""

    @abstractmethod
    def write(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        """Push: ``pieces.src`` (ours) -> ``pieces.dst`` (the peer's memory). Bytes moved."""

    @abstractmethod
    def close(self) -> None:
        """Release the data path; idempotent. No call may be running."""

    def failure(self, exc: DxlError) -> Failure:
        """Map one of this transport's failures to the status the operation fails with."""
        return native_failure(exc)

    def share_windows(self, key: Hashable, windows: Sequence[Sequence[int | None]]) -> list[Job]:
        """The peer shares memory through memfds (``[fd, offset, base, size, inode]`` rows)
        under ``key`` (a cache id, or ``"pool"``): use it if this transport can. Returns jobs
        for the engine's workers. A transport that cannot map peer memory ignores it."""
        return []

    def drop_windows(self, key: Hashable) -> None:  # noqa: B027 - optional: a no-op by default
        """Stop using what :meth:`share_windows` set up under ``key``."""

    @property
    def shared_windows(self) -> int:
        """How many of the peer's memfd windows are mapped here now (each holds a descriptor
        of the peer's memfd until it is unmapped)."""
        return 0

    def move_blocks(self, move: BlockMove, write: bool, timeout_ms: int | None) -> int | None:
        """Move whole blocks by index (``caps.block_index``); bytes moved, or None when this
        request cannot go that way (the engine then plans pieces for ``read``/``write``)."""
        return None

    def local_info(self) -> str:
        """What this transport must tell the peer once the link's caches are exchanged (a
        ``data_info`` frame each way); "" (the default): nothing, no frame."""
        return ""

    def attach(self, info: str, deadline_s: float) -> None:  # noqa: B027 - optional
        """The peer's ``data_info`` of the handshake: complete the data path (blocking, run
        off the event loop, bounded by ``deadline_s`` in ``time.monotonic``)."""

    def peer_info(self, info: str) -> None:  # noqa: B027 - optional
        """A later ``data_info`` of the peer (about a cache it registered since)."""


def native_failure(exc: DxlError) -> Failure:
    """The failures every transport shares: the shim's codes and the generic errors above."""
    if isinstance(exc, TransportClosed | PeerGone):
        return Failure(LLMStatusCode.LLM_LINK_FAILED, "is gone", peer_gone=True)
    if isinstance(exc, TransferTimeout):
        return Failure(
            LLMStatusCode.LLM_TIMEOUT, "did not complete the transfer within sync_kv_timeout"
        )
    code = exc.code if isinstance(exc, _ffi.NativeError) else None
    lib = _ffi.lib
    if code in (lib.DXL_E_SRCH, lib.DXL_E_PEER):
        return Failure(LLMStatusCode.LLM_LINK_FAILED, "is gone", peer_gone=True)
    if code == lib.DXL_E_TIMEDOUT:
        return Failure(
            LLMStatusCode.LLM_TIMEOUT, "did not complete the transfer within sync_kv_timeout"
        )
    if code == lib.DXL_E_REMOTE:
        return Failure(
            LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, "refused the request (its registration changed)"
        )
    if code == lib.DXL_E_FAULT:
        return Failure(
            LLMStatusCode.LLM_SUSPECT_REMOTE_ERROR,
            "has memory that is no longer mapped where it was registered",
        )
    return Failure(LLMStatusCode.LLM_FAILED, "failed the transfer")


class Unreachable(Transport):
    """Stands for the missing data path to a peer that neither shares our host nor runs a
    data server: the peer can reach us, we cannot reach it."""

    name = "none"
    caps = Capabilities(
        same_host_only=False, maps_peer_memory=False, inline=False, memory=frozenset()
    )

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def read(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        raise TransportClosed(self.reason)

    def write(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        raise TransportClosed(self.reason)

    def close(self) -> None:
        pass

    def failure(self, exc: DxlError) -> Failure:
        return Failure(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "cannot be reached")


@functools.cache
def host_identity() -> str:
    """Identify the kernel and pid namespace: same-host transports work only between equal
    identities."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return f"{boot}/pidns:{pidns}"
