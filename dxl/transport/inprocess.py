"""A data path between engines of one process, with faults injected on demand: for tests.

Engines given backends of one :class:`InProcessNetwork` (``Engine(..., transport_backend=
network.backend())``) move bytes between them with a memcpy instead of cma or tcp, so the mover,
the resolver, the handoff and the connector's logic run without child processes and without
data sockets (their control connections stay loopback tcp within the process). The backend is
injected per engine, as httpcore takes a network backend per connection pool: nothing global
changes, and ``dxl.Transport`` ``auto`` never picks it.

It keeps the rules the other transports keep: a peer is found by the incarnation it announced
and must be the cluster it said it is; every request is checked, as the tcp data server checks
it, against the regions the peer registered (its ``RegionRegistry``), so only what it advertised
is ever read or written; a peer that closed is gone.

:class:`Faults` (one per backend, so per engine) act on the transfers that engine starts: a
delay before every piece (a transfer that outlives its timeout fails with LLM_TIMEOUT), a
failure at the n-th piece with a chosen status (once: the next transfers work), and the peer's
death at the n-th piece (the link is closed, the peer stays unreachable).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .. import _ffi
from ..control.hello import PeerInfo
from ..errors import DxlError, LLMStatusCode
from ..memory import localcopy
from ..memory.plan import U64, Pieces
from ..memory.regions import RegionRegistry
from ..types import Placement
from .base import Capabilities, Failure, PeerGone, TransferTimeout, Transport, native_failure
from .select import OpenContext

__all__ = ["Faults", "InProcessBackend", "InProcessNetwork", "InProcessTransport", "Injected"]


class Injected(DxlError):
    """A failure :class:`Faults` injected; the operation fails with ``status``."""

    def __init__(self, status: LLMStatusCode, piece: int) -> None:
        super().__init__(f"injected failure at piece {piece}")
        self.status = status


class _Refused(DxlError):
    """The peer has not registered (or no longer has) the memory a request names."""


@dataclass
class Faults:
    """What goes wrong in the transfers of one engine's in-process transports.

    Pieces are counted over all of them, from 0, in the order they are moved (one request's
    pieces in plan order).

    Attributes:
        delay_s: sleep before every piece (the transfer still completes, unless it outlives
            its timeout: then it fails with LLM_TIMEOUT and the link stays).
        fail_at: the piece at which one transfer fails with ``fail_status`` (the pieces before
            it are moved); only once.
        fail_status: the status of that failure.
        die_at: the piece at which the peer dies: the transfer fails with LLM_LINK_FAILED, the
            engine closes the link, and the peer cannot be reached again.
    """

    delay_s: float = 0.0
    fail_at: int | None = None
    fail_status: LLMStatusCode = LLMStatusCode.LLM_FAILED
    die_at: int | None = None
    moved: int = 0  # pieces claimed by transfers so far (the faults count from here)
    dead: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s}")
        for name in ("fail_at", "die_at"):
            at = getattr(self, name)
            if at is not None and at < 0:
                raise ValueError(f"{name} must be None or >= 0, got {at}")

    def take(self, count: int) -> tuple[int, BaseException | None]:
        """Claim the next ``count`` pieces: ``(clean, error)``: the first ``clean`` of them may
        be moved, then ``error`` (if not None) ends the transfer. A fault set at a piece
        already passed strikes at the next one."""
        with self._lock:
            if self.dead:
                return 0, PeerGone("the peer died (injected)")
            first, end = self.moved, self.moved + count
            die = self.die_at if self.die_at is not None and self.die_at < end else None
            fail = self.fail_at if self.fail_at is not None and self.fail_at < end else None
            if die is not None and (fail is None or die <= fail):
                at = max(die, first)
                self.dead, self.moved = True, at + 1
                return at - first, PeerGone(f"the peer died at piece {at} (injected)")
            if fail is not None:
                at = max(fail, first)
                self.fail_at, self.moved = None, at + 1
                return at - first, Injected(self.fail_status, at)
            self.moved = end
            return count, None


@dataclass
class _Endpoint:
    """An engine on the network: who it is and the memory it serves."""

    cluster_id: int
    regions: RegionRegistry
    lock: threading.Lock = field(default_factory=threading.Lock)  # check + copy vs. leaving
    gone: bool = False


class InProcessNetwork:
    """The engines of this process that may reach one another by memcpy."""

    def __init__(self) -> None:
        self._endpoints: dict[str, _Endpoint] = {}
        self._lock = threading.Lock()

    def backend(self, faults: Faults | None = None) -> InProcessBackend:
        """A backend for one engine (``Engine(..., transport_backend=...)``); ``faults`` act
        on the transfers that engine starts."""
        return InProcessBackend(self, faults if faults is not None else Faults())

    def _join(self, incarnation: str, endpoint: _Endpoint) -> None:
        with self._lock:
            if incarnation in self._endpoints:
                raise ValueError(f"an engine with incarnation {incarnation} is already on it")
            self._endpoints[incarnation] = endpoint

    def _leave(self, incarnation: str) -> None:
        with self._lock:
            endpoint = self._endpoints.pop(incarnation, None)
        if endpoint is not None:
            with endpoint.lock:  # waits for a copy from or into its memory
                endpoint.gone = True

    def _find(self, incarnation: str) -> _Endpoint | None:
        with self._lock:
            return self._endpoints.get(incarnation)


class InProcessBackend:
    """The transport backend of one engine (see the module docstring)."""

    def __init__(self, network: InProcessNetwork, faults: Faults) -> None:
        self.network = network
        self.faults = faults
        self._incarnation: str | None = None

    def attach(self, cluster_id: int, incarnation: str, regions: RegionRegistry) -> None:
        """The engine joins the network; peers may reach what ``regions`` holds."""
        if self._incarnation is not None:
            raise ValueError("a transport backend serves one engine; make one per engine")
        self.network._join(incarnation, _Endpoint(cluster_id, regions))
        self._incarnation = incarnation

    def detach(self) -> None:
        """The engine closes: peers cannot reach it any more (their transfers fail, gone)."""
        if self._incarnation is not None:
            self.network._leave(self._incarnation)

    async def open(self, peer: PeerInfo, ctx: OpenContext) -> Transport:
        """The transport to ``peer``, which must be on the same network, as the cluster it
        says it is.

        Raises:
            PeerGone: it is not on the network (another process, closed, or dead by a fault).
        """
        endpoint = self.network._find(peer.incarnation)
        if endpoint is None or endpoint.gone:
            raise PeerGone(f"cluster {peer.cluster_id} is not on this in-process network")
        if endpoint.cluster_id != peer.cluster_id:
            raise PeerGone(
                f"the engine of incarnation {peer.incarnation} is cluster "
                f"{endpoint.cluster_id}, not {peer.cluster_id}"
            )
        if self.faults.dead:
            raise PeerGone("the peer died (injected)")
        return InProcessTransport(endpoint, self.faults, ctx.timeout_ms)


class InProcessTransport(Transport):
    """Moves pieces between two engines of this process (memcpy), checked against the peer's
    registry, with :class:`Faults`."""

    name = "inprocess"
    # never inline: an injected delay must not stall the loop
    caps = Capabilities(
        same_host_only=True,
        maps_peer_memory=False,
        inline=False,
        memory=frozenset({Placement.HOST}),
    )

    def __init__(self, endpoint: _Endpoint, faults: Faults, timeout_ms: int) -> None:
        self._peer = endpoint
        self._faults = faults
        self._timeout_ms = timeout_ms
        self._closed = False

    def read(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        return self._move(pieces, pieces.src, timeout_ms)

    def write(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        return self._move(pieces, pieces.dst, timeout_ms)

    def close(self) -> None:
        self._closed = True

    def failure(self, exc: DxlError) -> Failure:
        if isinstance(exc, Injected):
            return Failure(exc.status, "failed the transfer (injected)")
        if isinstance(exc, _Refused):
            return Failure(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"refused the request: {exc}")
        return native_failure(exc)

    def _move(self, pieces: Pieces, remote: np.ndarray, timeout_ms: int | None) -> int:
        timeout = self._timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + timeout / 1000
        peer = self._peer
        with peer.lock:
            if self._closed or peer.gone:
                raise PeerGone("the peer engine closed")
            self._check(remote, pieces.length)
            clean, error = self._faults.take(pieces.count)
            moved = self._copy(pieces, clean, deadline)
        if error is not None:
            raise error
        return moved

    def _check(self, remote: np.ndarray, length: np.ndarray) -> None:
        """Every remote range lies in a region the peer registered (as its data server checks
        a tcp request)."""
        n = int(length.size)
        if n == 0:
            return
        addr = np.ascontiguousarray(remote, dtype=U64)
        lens = np.ascontiguousarray(length, dtype=U64)
        bad = _ffi.ffi.new("uint64_t *")
        rc = _ffi.lib.dxl_region_check_pieces(
            self._peer.regions.native, _ffi.as_u64_ptr(addr), _ffi.as_u64_ptr(lens), n, bad
        )
        if rc == _ffi.lib.DXL_E_RANGE:
            i = int(bad[0])
            raise _Refused(
                f"piece {i} ({int(lens[i])} bytes at {int(addr[i]):#x}) is not in memory the "
                "peer registered"
            )
        _ffi.check(rc, "check the pieces against the peer's registry")

    def _copy(self, pieces: Pieces, count: int, deadline: float) -> int:
        """Move the first ``count`` pieces (one native copy without a delay, else one piece at
        a time after its delay)."""
        delay = self._faults.delay_s
        if delay == 0:
            return localcopy.run_pieces(_head(pieces, count), 1)
        moved = 0
        for i in range(count):
            left = deadline - time.monotonic()
            if left < delay:
                time.sleep(max(0.0, left))
                raise TransferTimeout(f"piece {i} was delayed past the timeout (injected)")
            time.sleep(delay)
            moved += localcopy.run_pieces(_slice(pieces, i, i + 1), 1)
        return moved


def _head(pieces: Pieces, count: int) -> Pieces:
    return pieces if count == pieces.count else _slice(pieces, 0, count)


def _slice(pieces: Pieces, start: int, end: int) -> Pieces:
    return Pieces(pieces.dst[start:end], pieces.src[start:end], pieces.length[start:end])
