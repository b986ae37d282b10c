"""The ``nixl`` transport: dxl's control plane over NIXL's data plane (the extra ``dxl[nixl]``).

One NIXL agent per engine (:class:`NixlHost`), created on the first link that uses this
transport, never at ``import dxl`` (nothing here imports ``nixl`` before then). It runs without
NIXL's progress thread, which busy-polls a core for as long as the agent lives: progress is
driven only while something is in flight (a transfer polls its own state; a link being set up
pumps the agent until the peer's warm-up read arrived, see :meth:`NixlHost.expect_warm`).

Every cache the engine registers is registered with the agent (host memory as ``DRAM``, device
memory as ``VRAM`` with its device id) and released from it only once the engine's own in-use
holds say no transfer touches it. The agent's metadata travels over the link's authenticated
control connection (a ``data_info`` frame in the handshake, and before each later ``reg_add``):
no etcd, no side channel, no pickle. The peer's agent is added when the link comes up and
removed when it goes (:meth:`NixlTransport.close`).

A request is one NIXL transfer of the planned pieces (one descriptor per coalesced piece, built
from the plan's arrays in one call: NIXL checks each against the registrations it knows); it
polls its state until done or the deadline, then releases the handle and fails with a timeout.

Trust: with RDMA hardware a peer reaches only memory registered with its agent (memory keys);
over UCX's emulated transports (tcp, cma, shared memory) it can read and write any address of
this process, so that needs ``dxl.NixlAllowEmulated`` (docs/security.md).
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DxlError, LLMStatusCode
from ..memory.plan import Pieces
from ..types import Placement
from .base import Capabilities, Failure, PeerGone, TransferTimeout, Transport, native_failure

__all__ = [
    "NixlHost",
    "NixlRefused",
    "NixlTransport",
    "hardware_rma",
    "nixl_version",
]

log = logging.getLogger("dxl")

WARM = b"dxl-warm"  # the notification a new link's warm-up read carries
MAX_INFO_CHARS = 1 << 20  # base64 metadata in one data_info frame (bounded by the frame size)
IB_DEVICES = "/sys/class/infiniband"  # RDMA devices the kernel knows (verbs: rc/dc/ud)
SPIN_POLLS = 64  # state checks before the poll loop starts sleeping
MAX_SLEEP_S = 0.001  # longest sleep between two state checks
PUMP_SLEEP_S = 0.0005  # between two progress calls of a link being set up

# Every live host of this process: a transfer between two engines of one process completes
# only if the target's agent progresses too, so a polling transfer drives them all.
_HOSTS: weakref.WeakSet[NixlHost] = weakref.WeakSet()


class NixlRefused(DxlError):
    """The nixl transport cannot be used for this link (not installed, or not allowed)."""


class NixlFailed(DxlError):
    """NIXL failed a transfer (not a dead peer and not a timeout)."""


class NixlNotRegistered(NixlFailed):
    """NIXL refused a descriptor outside the registrations it knows."""


def nixl_version() -> str | None:
    """The installed ``nixl`` version, without importing it; None when it is not installed."""
    try:
        return importlib.metadata.version("nixl")
    except importlib.metadata.PackageNotFoundError:
        return None


def hardware_rma() -> list[str]:
    """The RDMA devices of this host (verbs: UCX's rc/dc/ud); [] means UCX can only emulate RMA
    for host memory (tcp, cma, shared memory), under which a NIXL peer reaches any address."""
    try:
        return sorted(os.listdir(IB_DEVICES))
    except OSError:
        return []


def _mem_type(placement: Placement) -> str:
    return "VRAM" if placement == Placement.DEVICE else "DRAM"


class NixlHost:
    """The NIXL agent of one engine (see the module docstring). Thread-safe.

    Args:
        name: the agent's name, unique per engine run (``dxl-<cluster>-<incarnation>``).
        probe: ``[address, token]``: the engine's 8-byte probe word, which a peer's warm-up
            read targets.
        allow_emulated: ``dxl.NixlAllowEmulated``: link even without RDMA hardware.
        device_id: the device of ``Placement.DEVICE`` caches (``ge.exec.deviceId``).
    """

    def __init__(
        self, name: str, probe: Sequence[int], *, allow_emulated: bool, device_id: int
    ) -> None:
        self.name = name
        self._probe_addr = int(probe[0])
        self.allow_emulated = allow_emulated
        self._device_id = device_id
        self._lock = threading.Lock()
        self._agent: Any = None
        self._scratch = np.zeros(1, dtype=np.uint64)  # where our warm-up reads land
        self._caches: dict[int, tuple[list[tuple[int, int, int, str]], str]] = {}
        self._regs: dict[int, Any] = {}  # cache id -> the agent's registration
        self._warming: dict[str, float] = {}  # peer agent -> deadline of its warm-up read
        self._pump: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ the agent
    @property
    def agent(self) -> Any:
        """The agent, created (and every registered cache registered with it) on first use.

        Raises:
            NixlRefused: nixl is not installed, or cannot build its UCX backend here.
        """
        with self._lock:
            if self._closed:
                raise NixlRefused("the engine is closing")
            if self._agent is None:
                self._agent = self._create()
                _HOSTS.add(self)
            return self._agent

    def _create(self) -> Any:
        try:
            from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
        except ImportError as exc:
            raise NixlRefused(f"nixl is not installed (pip install 'dxl[nixl]'): {exc}") from exc
        config = nixl_agent_config(
            enable_prog_thread=False,  # it busy-polls a core forever; we poll only in flight
            backends=["UCX"],
            sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,  # workers call concurrently
        )
        try:
            agent = nixl_agent(self.name, config)
        except Exception as exc:  # nixlBackendError: UCX could not start
            raise NixlRefused(f"NIXL could not create its UCX backend: {exc}") from exc
        agent.register_memory([(self._probe_addr, 8, 0, "")], "DRAM")
        agent.register_memory([(self._scratch.ctypes.data, 8, 0, "")], "DRAM")
        for cache_id, (ranges, mem) in self._caches.items():
            self._regs[cache_id] = agent.register_memory(ranges, mem)
        return agent

    def metadata(self) -> str:
        """Everything a peer needs to reach this agent (connection and memory), as text."""
        return base64.b64encode(bytes(self.agent.get_agent_metadata())).decode()

    # ------------------------------------------------------------------ registrations
    def cache_added(
        self, cache_id: int, addrs: Sequence[int], nbytes: int, placement: Placement
    ) -> None:
        """A registration of the engine (before it is advertised): register it with the agent
        if there is one (else when the agent is created)."""
        dev = self._device_id if placement == Placement.DEVICE else 0
        ranges = [(int(a), int(nbytes), dev, "") for a in addrs]
        mem = _mem_type(placement)
        with self._lock:
            self._caches[cache_id] = (ranges, mem)
            if self._agent is not None:
                self._regs[cache_id] = self._agent.register_memory(ranges, mem)

    def cache_removed(self, cache_id: int) -> None:
        """A registration is gone and no transfer of this engine touches it any more."""
        with self._lock:
            self._caches.pop(cache_id, None)
            reg = self._regs.pop(cache_id, None)
            if reg is not None and self._agent is not None:
                self._agent.deregister_memory(reg)

    def cache_info(self, cache_id: int) -> str:
        """The agent's metadata of one cache (its memory section only), for peers linked
        before it was registered; "" without an agent."""
        with self._lock:
            reg = self._regs.get(cache_id)
            if reg is None or self._agent is None:
                return ""
            blob = self._agent.get_partial_agent_metadata(reg, False, [])
        return base64.b64encode(bytes(blob)).decode()

    def load(self, info: str) -> str:
        """Load a peer's metadata (full or partial); returns its agent's name.

        Raises:
            NixlFailed: the text is not metadata NIXL accepts.
        """
        try:
            blob = base64.b64decode(info.encode(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise NixlFailed(f"the peer's NIXL metadata is not base64: {exc}") from exc
        try:
            name = self.agent.add_remote_agent(blob)
        except Exception as exc:  # nixl's errors derive from Exception only
            raise NixlFailed(f"NIXL refused the peer's metadata: {exc}") from exc
        return name.decode() if isinstance(name, bytes) else str(name)

    def forget(self, peer: str) -> None:
        with self._lock:
            agent = self._agent
            self._warming.pop(peer, None)
        if agent is not None:
            try:
                agent.remove_remote_agent(peer)
            except Exception as exc:  # already gone: nothing left to release
                log.debug("dxl: nixl: removing agent %s: %s", peer, exc)

    # ------------------------------------------------------------------ progress
    def progress(self) -> None:
        """Drive this agent once (it serves peers' requests only when driven); note the peers
        whose warm-up read arrived."""
        agent = self._agent
        if agent is None:
            return
        notifs = agent.get_new_notifs()
        if notifs:
            with self._lock:
                for peer, msgs in notifs.items():
                    name = peer.decode() if isinstance(peer, bytes) else str(peer)
                    if WARM in msgs:
                        self._warming.pop(name, None)

    def expect_warm(self, peer: str, deadline_s: float) -> None:
        """Drive this agent (a thread) until ``peer``'s warm-up read arrived or ``deadline_s``
        (time.monotonic) passed: a new link's first request completes only if its target
        progresses, and no thread here progresses the agent otherwise."""
        with self._lock:
            self._warming[peer] = deadline_s
            if self._pump is None:
                self._pump = threading.Thread(target=self._pump_run, name=f"{self.name}-warm")
                self._pump.daemon = True
                self._pump.start()

    def warm_pending(self, peer: str) -> bool:
        with self._lock:
            return peer in self._warming

    def _pump_run(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                for peer in [p for p, d in self._warming.items() if d <= now]:
                    del self._warming[peer]
                if not self._warming or self._closed:
                    self._pump = None
                    return
            try:
                self.progress()
            except Exception as exc:  # a peer died mid-setup: its link fails on its own
                log.debug("dxl: nixl: progress while warming: %s", exc)
            time.sleep(PUMP_SLEEP_S)

    def close(self) -> None:
        """Release the agent (every link and registration is gone)."""
        with self._lock:
            self._closed = True
            self._warming.clear()
            pump, agent = self._pump, self._agent
            self._agent = None
        if pump is not None:
            pump.join(1.0)
        _HOSTS.discard(self)
        del agent  # the agent frees its backends when the last reference goes


def _progress_all(but: NixlHost) -> None:
    """Drive the other agents of this process: a transfer to an engine of this very process
    completes only while the target's agent progresses."""
    for host in list(_HOSTS):
        if host is not but:
            try:
                host.progress()
            except Exception as exc:  # that engine's own transfers report its failures
                log.debug("dxl: nixl: driving agent %s: %s", host.name, exc)


class NixlTransport(Transport):
    """The data path to one peer through this engine's NIXL agent (module docstring)."""

    name = "nixl"
    caps = Capabilities(
        same_host_only=False,
        maps_peer_memory=False,
        inline=False,  # a transfer may wait on the peer
        memory=frozenset({Placement.HOST}),
    )

    def __init__(self, host: NixlHost, peer_agent: str, timeout_ms: int) -> None:
        self._host = host
        self._peer = peer_agent
        self._timeout_ms = timeout_ms
        self._loaded = False
        self._closed = False

    @property
    def peer_agent(self) -> str:
        return self._peer

    def local_info(self) -> str:
        return self._host.metadata()

    def attach(self, info: str, deadline_s: float) -> None:
        """Load the peer's metadata (the agent it names must be the one this link expects)
        and warm the link up: one 8-byte read of the peer's probe word, with the notification
        that ends the peer's warm-up pump. Blocking, bounded by ``deadline_s`` (monotonic)."""
        name = self._host.load(info)
        if name != self._peer:
            self._host.forget(name)
            raise NixlFailed(f"the peer's NIXL agent is {name!r}, not {self._peer!r}")
        self._loaded = True
        pieces = Pieces(
            np.array([self._host._scratch.ctypes.data], dtype=np.uint64),
            np.array([self._peer_probe], dtype=np.uint64),
            np.array([8], dtype=np.uint64),
        )
        left_ms = max(1, int((deadline_s - time.monotonic()) * 1000))
        self._move("READ", pieces, left_ms, WARM)

    _peer_probe = 0  # set by the opener: the peer's probe address (its warm-up target)

    def peer_info(self, info: str) -> None:
        """More of the peer's metadata (a cache it registered after the link came up)."""
        if info and not self._closed:
            name = self._host.load(info)
            if name != self._peer:
                raise NixlFailed(f"metadata of agent {name!r} on the link of {self._peer!r}")

    def read(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        return self._move("READ", pieces, timeout_ms)

    def write(self, pieces: Pieces, timeout_ms: int | None = None) -> int:
        return self._move("WRITE", pieces, timeout_ms)

    def _move(self, op: str, pieces: Pieces, timeout_ms: int | None, notif: bytes = b"") -> int:
        if self._closed or not self._loaded:
            raise PeerGone("the link's NIXL agent is gone")
        if pieces.count == 0:
            return 0
        agent = self._host.agent
        zeros = np.zeros(pieces.count, dtype=np.uint64)
        local_addrs = pieces.dst if op == "READ" else pieces.src
        remote_addrs = pieces.src if op == "READ" else pieces.dst
        bound_ms = self._timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + bound_ms / 1000
        try:
            local = agent.get_xfer_descs(
                np.column_stack((local_addrs, pieces.length, zeros)).astype(np.uint64), "DRAM"
            )
            remote = agent.get_xfer_descs(
                np.column_stack((remote_addrs, pieces.length, zeros)).astype(np.uint64), "DRAM"
            )
            handle = agent.initialize_xfer(op, local, remote, self._peer, notif)
        except Exception as exc:
            raise _nixl_error(exc) from exc
        try:
            state = agent.transfer(handle)
            polls = 0
            sleep = 0.00002
            while state == "PROC":
                if time.monotonic() >= deadline:
                    raise TransferTimeout(
                        f"the NIXL {op} of {pieces.nbytes} bytes did not complete in "
                        f"{bound_ms} ms; released"
                    )
                _progress_all(self._host)
                polls += 1
                if polls > SPIN_POLLS:
                    time.sleep(sleep)
                    sleep = min(sleep * 2, MAX_SLEEP_S)
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise NixlFailed(f"NIXL reported {state} for the {op}")
        except DxlError:
            raise
        except Exception as exc:
            raise _nixl_error(exc) from exc
        finally:
            try:
                handle.release()  # a transfer still in flight is aborted by its release
            except Exception as exc:
                log.debug("dxl: nixl: releasing a transfer handle: %s", exc)
        return pieces.nbytes

    def failure(self, exc: DxlError) -> Failure:
        if isinstance(exc, NixlNotRegistered):
            return Failure(
                LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                "has no NIXL registration covering the request (its registration changed)",
            )
        if isinstance(exc, NixlFailed):
            return Failure(LLMStatusCode.LLM_FAILED, "failed the NIXL transfer")
        return native_failure(exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._host.forget(self._peer)


def _nixl_error(exc: Exception) -> DxlError:
    """A NIXL exception as one of ours (their classes live in the loaded nixl_cuXX module)."""
    kind = type(exc).__name__
    if kind == "nixlRemoteDisconnectError":
        return PeerGone(f"NIXL: the peer disconnected ({exc})")
    if kind == "nixlNotFoundError":
        return NixlNotRegistered(f"NIXL: {exc}")
    return NixlFailed(f"NIXL: {kind}: {exc}")


def agent_name(cluster_id: int, incarnation: str) -> str:
    """The NIXL agent name of one engine run: unique per process start, so a restarted peer
    is a new agent."""
    return f"dxl-{cluster_id}-{incarnation}"


def open_nixl(
    host: NixlHost | None,
    peer_cluster: int,
    peer_incarnation: str,
    peer_probe: int,
    left_s: float,
    timeout_ms: int,
) -> NixlTransport:
    """The nixl transport of a new link (its peer's metadata comes later, in ``attach``).

    Raises:
        NixlRefused: no agent (not asked for), or no RDMA hardware and emulated RMA not
            allowed (``dxl.NixlAllowEmulated``), or nixl cannot start.
    """
    if host is None:
        raise NixlRefused("this engine has no NIXL agent (dxl.Transport is not nixl)")
    if not host.allow_emulated and not hardware_rma():
        raise NixlRefused(
            f"this host has no RDMA device ({IB_DEVICES} is empty), so UCX would emulate RMA "
            "over tcp/cma/shared memory, under which a linked NIXL peer can read and write "
            "any address of this process, not only registered caches; set "
            "dxl.NixlAllowEmulated=1 on a trusted pair to allow it (docs/security.md)"
        )
    host.agent  # noqa: B018 (creates it: NixlRefused when nixl cannot start)
    peer = agent_name(peer_cluster, peer_incarnation)
    transport = NixlTransport(host, peer, timeout_ms)
    transport._peer_probe = int(peer_probe)
    host.expect_warm(peer, time.monotonic() + left_s)  # the peer's warm-up read needs us
    return transport
